# Apache httpd with Gateway, serving the bundled demo application in embedded
# and daemon mode on port 80. Build from the repository root:
#   docker build -f docker/apache.Dockerfile -t gateway-apache .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY tools/install-deps tools/install-deps
RUN tools/install-deps --build
COPY Cargo.toml Cargo.lock build.rs Makefile ./
COPY .cargo .cargo
COPY c-shim c-shim
COPY src src
RUN make apache && make install-apache DESTDIR=/staging

FROM debian:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends apache2 libpython3.11 python3 curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /staging/ /
COPY demo/app.py /srv/demo/app.py
COPY docker/apache-demo.conf /etc/apache2/sites-available/000-default.conf
RUN a2enmod gateway
EXPOSE 80
HEALTHCHECK CMD curl -fs http://127.0.0.1/embedded/ || exit 1
CMD ["apache2ctl", "-D", "FOREGROUND"]
