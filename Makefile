# nextgate: the two commands a fresh machine needs are `make run` and `make test`.
# Both install missing build prerequisites first (Debian: cmake for Pingora's zlib-ng build).

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STATIC_TARGET := x86_64-unknown-linux-gnu

.PHONY: run test test-deps deps build release image bench-proxy bench-hub clean

## Install build prerequisites that a fresh Debian machine lacks.
deps:
	@command -v cmake >/dev/null 2>&1 || { \
	  echo "installing cmake (needed to build Pingora's zlib-ng)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake; }
	@command -v $(CARGO) >/dev/null 2>&1 || { echo "cargo not found: install Rust (rustup) first"; exit 1; }

## Test prerequisites: promtool and prometheus (Debian's `prometheus` package) for the
## metrics tests.
test-deps: deps
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing prometheus (promtool and a server for the metrics tests)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; }

## Run the gateway on its built-in defaults (proxy :8080, admin 127.0.0.1:8081).
run: deps
	$(CARGO) run --release --bin nextgate

## Run the whole test suite, including the long WebSocket idle test.
test: test-deps
	$(CARGO) test --all-targets
	$(CARGO) test --test proxy -- --ignored

build: deps
	$(CARGO) build

release: deps
	$(CARGO) build --release

## Static binary in a FROM-scratch image (no registry needed): `docker run` it with -p.
image: deps
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --target $(STATIC_TARGET)
	docker build -t nextgate:latest .

## Side-by-side proxy benchmark against nginx (installs nginx and wrk if missing).
bench-proxy: deps
	$(CARGO) build --release --bin nextgate --example bare_pingora
	benches/proxy_vs_nginx.py --bare

## Side-by-side event hub benchmark against Nchan (installs nginx and libnginx-mod-nchan).
bench-hub: deps
	$(CARGO) build --release --bin nextgate --example hub_load
	benches/hub_vs_nchan.py

clean:
	$(CARGO) clean
