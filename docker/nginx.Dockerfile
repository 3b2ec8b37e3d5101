# nginx with Gateway, serving the bundled demo application in embedded and
# daemon mode on port 80, on Debian 12 (bookworm, the default) or 13 (trixie).
# Build from the repository root:
#   docker build -f docker/nginx.Dockerfile -t gateway-nginx .
#   docker build -f docker/nginx.Dockerfile --build-arg DEBIAN=trixie -t gateway-nginx:trixie .
# The module must match the nginx it loads into exactly (version and build
# signature): both stages use the same release's nginx. Both install with
# tools/install-deps, as CI does on both releases.
ARG DEBIAN=bookworm

FROM rust:1-${DEBIAN} AS build
WORKDIR /src
COPY tools/install-deps tools/install-deps
RUN tools/install-deps --build
COPY Cargo.toml Cargo.lock build.rs Makefile ./
COPY .cargo .cargo
COPY c-shim c-shim
COPY src src
RUN make nginx && make install-nginx DESTDIR=/staging

FROM debian:${DEBIAN}
COPY tools/install-deps /usr/local/sbin/gateway-install-deps
RUN gateway-install-deps --run nginx && rm -rf /var/lib/apt/lists/*
COPY --from=build /staging/ /
COPY demo/app.py /srv/demo/app.py
COPY docker/nginx-demo.conf /etc/nginx/sites-available/default
EXPOSE 80
HEALTHCHECK CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1/embedded/')"
CMD ["nginx", "-g", "daemon off;"]
