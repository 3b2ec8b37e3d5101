# Apache httpd with Gateway, serving the bundled demo application in embedded
# and daemon mode on port 80, on Debian 12 (bookworm, the default) or 13 (trixie).
# Build from the repository root:
#   docker build -f docker/apache.Dockerfile -t gateway-apache .
#   docker build -f docker/apache.Dockerfile --build-arg DEBIAN=trixie -t gateway-apache:trixie .
# Both stages install with tools/install-deps, as CI does on both releases.
ARG DEBIAN=bookworm

FROM rust:1-${DEBIAN} AS build
WORKDIR /src
COPY tools/install-deps tools/install-deps
RUN tools/install-deps --build
COPY Cargo.toml Cargo.lock build.rs Makefile ./
COPY .cargo .cargo
COPY c-shim c-shim
COPY src src
RUN make apache && make install-apache DESTDIR=/staging

FROM debian:${DEBIAN}
COPY tools/install-deps /usr/local/sbin/gateway-install-deps
RUN gateway-install-deps --run apache && rm -rf /var/lib/apt/lists/*
COPY --from=build /staging/ /
COPY demo/app.py /srv/demo/app.py
COPY docker/apache-demo.conf /etc/apache2/sites-available/000-default.conf
RUN a2enmod gateway
EXPOSE 80
HEALTHCHECK CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1/embedded/')"
CMD ["apache2ctl", "-D", "FOREGROUND"]
