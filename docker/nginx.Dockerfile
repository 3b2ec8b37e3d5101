# nginx with Gateway, serving the bundled demo application in embedded and
# daemon mode on port 80. Build from the repository root:
#   docker build -f docker/nginx.Dockerfile -t gateway-nginx .
# The module must match the nginx it loads into exactly (version and build
# signature): both stages use Debian bookworm's nginx.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY tools/install-deps tools/install-deps
RUN tools/install-deps --build
COPY Cargo.toml Cargo.lock build.rs Makefile ./
COPY .cargo .cargo
COPY c-shim c-shim
COPY src src
RUN make nginx && make install-nginx DESTDIR=/staging

FROM debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx libpython3.11 python3 curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /staging/ /
COPY demo/app.py /srv/demo/app.py
COPY docker/nginx-demo.conf /etc/nginx/sites-available/default
EXPOSE 80
HEALTHCHECK CMD curl -fs http://127.0.0.1/embedded/ || exit 1
CMD ["nginx", "-g", "daemon off;"]
