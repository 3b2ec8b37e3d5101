# Builds the server modules into target/modules/.
#
#   make                 both modules (mod_gateway.so, ngx_http_gateway_module.so)
#   make apache          only mod_gateway.so
#   make nginx           only ngx_http_gateway_module.so (needs nginx-dev)
#   make faults          the three again with the test-only fault-injection feature
#   make test            the test suite against the real servers (builds both sets)
#   make demo            a demo application served by Apache on localhost
#
# PYTHON selects the interpreter to embed (default: Debian's /usr/bin/python3).

PYTHON ?= /usr/bin/python3
CARGO ?= cargo
CC ?= cc
MODULES := target/modules
PY_LIBDIR := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
PY_LDVERSION := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("LDVERSION"))')
PY_SHARED := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("Py_ENABLE_SHARED") or 0)')
# libpython is a shared dependency (DT_NEEDED) so C extension modules find its symbols.
PY_LIBS := -L$(PY_LIBDIR) -Wl,-rpath,$(PY_LIBDIR) -lpython$(PY_LDVERSION)
SYS_LIBS := -lpthread -ldl -lm -lutil -lgcc_s -lc
export PYO3_PYTHON := $(PYTHON)

.PHONY: all apache nginx faults test demo check-python clean FORCE

all: apache nginx

apache: $(MODULES)/mod_gateway.so $(MODULES)/gateway-daemon

nginx: $(MODULES)/ngx_http_gateway_module.so $(MODULES)/gateway-daemon

check-python:
	@test -x "$(PYTHON)" || { echo "error: $(PYTHON) not found: install python3-dev or set PYTHON=/path/to/python3" >&2; exit 1; }
	@test "$(PY_SHARED)" = 1 || { echo "error: $(PYTHON) has no shared libpython; Gateway needs one (Debian: apt-get install python3-dev)" >&2; exit 1; }
	@test -e "$(PY_LIBDIR)/libpython$(PY_LDVERSION).so" || { echo "error: $(PY_LIBDIR)/libpython$(PY_LDVERSION).so is missing (Debian: apt-get install python3-dev)" >&2; exit 1; }

# All release builds share one cargo target directory, and the fault builds another: the builds
# differ only in features, so the dependencies (bindgen, PyO3, ...) compile once per directory
# instead of once per module. Cargo leaves each build's libgateway.a and gateway-daemon at the
# same path, so a build and the step that reads its output hold one lock (make -j).
RELEASE_DIR := target/release-build
FAULTS_DIR := target/faults-build
locked = @mkdir -p target && flock target/.build.lock sh -ec '$(1)'

# $(call build-apache,CARGO-ARGS,TARGET-DIR,OUT) and $(call build-nginx,...) build the staticlib
# and link it with its shim's symbols kept; nginx looks up ngx_modules, ngx_module_names and
# ngx_module_order in the module (the generated module list that build.rs compiles into the
# staticlib). $(call build-daemon,...) builds the daemon executable, installed next to them.
build-apache = $(call locked,mkdir -p $(dir $(3)); $(CARGO) build --release --lib $(1) --target-dir $(2); \
	$(CC) -shared -o $(3) -Wl$(comma)-u$(comma)gateway_module -Wl$(comma)--version-script=c-shim/apache.map \
	-Wl$(comma)--gc-sections $(2)/release/libgateway.a $(PY_LIBS) $(SYS_LIBS))
build-nginx = $(call locked,mkdir -p $(dir $(3)); $(CARGO) build --release --lib $(1) --target-dir $(2); \
	$(CC) -shared -o $(3) -Wl$(comma)-u$(comma)ngx_modules -Wl$(comma)-u$(comma)ngx_module_names \
	-Wl$(comma)-u$(comma)ngx_module_order -Wl$(comma)--version-script=c-shim/nginx.map \
	-Wl$(comma)--gc-sections $(2)/release/libgateway.a $(PY_LIBS) $(SYS_LIBS))
build-daemon = $(call locked,$(CARGO) build --release --bin gateway-daemon $(1) --target-dir $(2); \
	install -D -m 0755 $(2)/release/gateway-daemon $(3))
comma := ,

$(MODULES)/mod_gateway.so: check-python FORCE
	$(call build-apache,--features apache,$(RELEASE_DIR),$@)

# The daemon executable (supervisor and daemon processes of daemon mode) is
# server-neutral: one build, next to the modules, where they look for it.
$(MODULES)/gateway-daemon: check-python FORCE
	$(call build-daemon,,$(RELEASE_DIR),$@)

$(MODULES)/ngx_http_gateway_module.so: check-python FORCE
	$(call build-nginx,--features nginx,$(RELEASE_DIR),$@)

# The same three with the test-only cargo feature fault-injection, for the tests that make
# the module panic on purpose (GATEWAY_FAULT names where); never installed. Without LTO:
# they are built for the tests only, and link faster.
FAULTS := target/modules-faults
$(FAULTS)/%: export CARGO_PROFILE_RELEASE_LTO := false

faults: $(FAULTS)/mod_gateway.so $(FAULTS)/ngx_http_gateway_module.so $(FAULTS)/gateway-daemon

$(FAULTS)/mod_gateway.so: check-python FORCE
	$(call build-apache,--features apache$(comma)fault-injection,$(FAULTS_DIR),$@)

$(FAULTS)/ngx_http_gateway_module.so: check-python FORCE
	$(call build-nginx,--features nginx$(comma)fault-injection,$(FAULTS_DIR),$@)

$(FAULTS)/gateway-daemon: check-python FORCE
	$(call build-daemon,--features fault-injection,$(FAULTS_DIR),$@)

test: all faults
	tests/run

demo: all
	demo/run

clean:
	$(CARGO) clean

# --- Installation into the servers' standard places (Debian layout by default) ---
#
#   make install        both modules, with gateway.load (a2enmod gateway) and nginx's snippet
#   make uninstall      removes everything install put there (with DESTDIR, also the
#                       directories it made there, once empty)
#
# Other layouts: APACHE_MODDIR (default: apxs -q LIBEXECDIR), APACHE_CONFDIR,
# NGINX_MODDIR (default: nginx's --modules-path), NGINX_CONFDIR, NGINX_ENABLEDDIR, DESTDIR for staging.

APXS ?= apxs
APACHE_MODDIR ?= $(shell $(APXS) -q LIBEXECDIR 2>/dev/null || echo /usr/lib/apache2/modules)
APACHE_CONFDIR ?= /etc/apache2/mods-available

NGINX_MODDIR ?= $(shell nginx -V 2>&1 | sed -n 's/.*--modules-path=\([^ ]*\).*/\1/p' | grep . || echo /usr/lib/nginx/modules)
NGINX_CONFDIR ?= /usr/share/nginx/modules-available
NGINX_ENABLEDDIR ?= /etc/nginx/modules-enabled

.PHONY: install uninstall install-apache uninstall-apache install-nginx uninstall-nginx

install: install-apache install-nginx

uninstall: uninstall-apache uninstall-nginx

# Removes the directories $(1) under DESTDIR, and their parents there, that are
# empty: install made them in the staging tree. The system's own (no DESTDIR)
# belong to the servers' packages and stay.
remove-staged-dirs = $(if $(DESTDIR),for d in $(1); do \
	(cd "$(DESTDIR)" && rmdir -p --ignore-fail-on-non-empty "./$$d" 2>/dev/null) || true; done)

install-apache: $(MODULES)/mod_gateway.so $(MODULES)/gateway-daemon
	install -d $(DESTDIR)$(APACHE_MODDIR) $(DESTDIR)$(APACHE_CONFDIR)
	install -m 644 $(MODULES)/mod_gateway.so $(DESTDIR)$(APACHE_MODDIR)/mod_gateway.so
	install -m 755 $(MODULES)/gateway-daemon $(DESTDIR)$(APACHE_MODDIR)/gateway-daemon
	printf '# Gateway: Python WSGI applications in Apache (embedded or daemon mode)\nLoadModule gateway_module %s/mod_gateway.so\n' \
		"$(APACHE_MODDIR)" > $(DESTDIR)$(APACHE_CONFDIR)/gateway.load
	@echo "installed: enable with 'a2enmod gateway' (and disable mod_wsgi: a2dismod wsgi)"

uninstall-apache:
	-[ -n "$(DESTDIR)" ] || ! command -v a2dismod >/dev/null || a2dismod -q gateway 2>/dev/null
	rm -f $(DESTDIR)$(APACHE_MODDIR)/mod_gateway.so $(DESTDIR)$(APACHE_MODDIR)/gateway-daemon \
		$(DESTDIR)$(APACHE_CONFDIR)/gateway.load
	@$(call remove-staged-dirs,$(APACHE_MODDIR) $(APACHE_CONFDIR))

# Debian enables a module by linking its snippet into /etc/nginx/modules-enabled/.
# nginx refuses a module built for another version or build signature: ask it
# first (NGINX names the binary that will load it).
NGINX ?= $(shell command -v nginx || echo /usr/sbin/nginx)

install-nginx: $(MODULES)/ngx_http_gateway_module.so $(MODULES)/gateway-daemon
	tools/check-nginx-module $(MODULES)/ngx_http_gateway_module.so $(NGINX)
	install -d $(DESTDIR)$(NGINX_MODDIR) $(DESTDIR)$(NGINX_CONFDIR)
	install -m 644 $(MODULES)/ngx_http_gateway_module.so $(DESTDIR)$(NGINX_MODDIR)/ngx_http_gateway_module.so
	install -m 755 $(MODULES)/gateway-daemon $(DESTDIR)$(NGINX_MODDIR)/gateway-daemon
	printf '# Gateway: Python WSGI applications in nginx (embedded or daemon mode)\nload_module %s/ngx_http_gateway_module.so;\n' \
		"$(NGINX_MODDIR)" > $(DESTDIR)$(NGINX_CONFDIR)/mod-http-gateway.conf
	@echo "installed: enable with 'ln -s $(NGINX_CONFDIR)/mod-http-gateway.conf $(NGINX_ENABLEDDIR)/50-mod-http-gateway.conf'"

uninstall-nginx:
	rm -f $(DESTDIR)$(NGINX_ENABLEDDIR)/50-mod-http-gateway.conf
	rm -f $(DESTDIR)$(NGINX_MODDIR)/ngx_http_gateway_module.so $(DESTDIR)$(NGINX_MODDIR)/gateway-daemon \
		$(DESTDIR)$(NGINX_CONFDIR)/mod-http-gateway.conf
	@$(call remove-staged-dirs,$(NGINX_MODDIR) $(NGINX_CONFDIR))
