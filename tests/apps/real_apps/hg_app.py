"""Mercurial's hgweb, unmodified (as contrib/hgweb.wsgi sets it up), serving the
repository repos/hgrepo beside this file; its .hg/hgrc allows push over http."""

from pathlib import Path

from mercurial import demandimport

demandimport.enable()

from mercurial.hgweb import hgweb  # noqa: E402

application = hgweb(str(Path(__file__).parent / "repos" / "hgrepo").encode())
