# knockgate — the two commands: `make demo` and `make test` (as root on Debian/Ubuntu).

DEBS := libnftnl-dev libmnl-dev pkg-config nftables iproute2 iputils-ping procps python3 openssh-server openssh-client util-linux dnsmasq-base curl systemd

.PHONY: deps build demo test lint package
deps: ## install the Debian packages the build, the lab and the demo need
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@command -v cargo >/dev/null || { echo "cargo missing: install Rust >= 1.85 (rustup)"; exit 1; }

build: deps
	cargo build --locked

demo: build ## the baseline at work in throwaway network namespaces
	bash examples/lab-demo.sh target/debug/knockgated

test: deps ## the whole suite: unit, CLI and lab (the lab needs root)
	cargo test --locked

package: deps ## a Debian package in target/debian (installs cargo-deb if missing)
	bash .ci/package-check

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings
	cargo clippy --locked --no-default-features --all-targets -- -D warnings
