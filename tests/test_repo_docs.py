"""The README's reference must say what the code does: directive names come from
the shims' directive tables, daemon options from the option parser."""

import re

from harness import ROOT

README = (ROOT / "README.md").read_text()


def readme_directives(prefix):
    """First word of each backticked directive in a README table row."""
    return {m.group(1) for m in re.finditer(r"^\| `(" + prefix + r"\w*)", README, re.M)}


def test_apache_directives_match_the_shim():
    shim = (ROOT / "c-shim" / "mod_gateway.c").read_text()
    in_code = set(re.findall(r'AP_INIT_\w+\("(\w+)"', shim))
    assert in_code, "no directives found in the Apache shim"
    assert readme_directives("Gateway") == in_code


def test_nginx_directives_match_the_shim():
    shim = ROOT / "c-shim" / "ngx_http_gateway_module.c"
    in_code = set(re.findall(r'ngx_string\("(gateway_\w+)"\)', shim.read_text())) if shim.exists() else set()
    assert readme_directives("gateway_") == in_code


def test_daemon_options_match_the_parser():
    parser = (ROOT / "src" / "common" / "config.rs").read_text()
    keys = re.search(r"DAEMON_OPTION_KEYS: &\[&str\] = &\[(.*?)\];", parser, re.S).group(1)
    in_code = set(re.findall(r'"([\w-]+)"', keys))
    section = README.split("### Daemon group options", 1)[1].split("##", 1)[0]
    in_readme = set(re.findall(r"`([\w-]+)=", section))
    assert in_readme == in_code
