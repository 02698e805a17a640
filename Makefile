# knockgate — the two commands: `make demo` and `make test` (as root on Debian/Ubuntu).

DEBS := libnftnl-dev libmnl-dev pkg-config nftables iproute2 iputils-ping procps python3 openssh-server openssh-client util-linux dnsmasq-base curl systemd adduser

.PHONY: deps build demo test test-unit lint package peers client-static bench bench-smoke vm test-vm
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

test: test-unit test-vm ## the whole suite: unit, CLI, netns lab, and the VM lab (root)

test-unit: deps peers ## unit, CLI and the network-namespace lab on this kernel (the lab needs root; the fwknop lab uses the real client from `make peers`)
	cargo test --locked

vm: ## Debian 12 (6.1) and 13 (6.12) images for the VM lab, under target/vm (root)
	bash vm/deps.sh
	bash vm/build-image.sh bookworm target/vm/bookworm
	bash vm/build-image.sh trixie target/vm/trixie

test-vm: package vm ## the package in Debian's own kernels with systemd as PID 1 (qemu, root)
	bash vm/test-vm.sh

package: deps ## a Debian package in target/debian (installs cargo-deb if missing)
	bash .ci/package-check

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings
	cargo clippy --locked --no-default-features --all-targets -- -D warnings

# The peers of the comparison bench, from Debian: their libraries and iptables are
# installed; the daemons' own packages are only unpacked into target/peers/root
# (never installed, so no maintainer script starts fwknopd or knockd on the host).
PEER_LIBS := iptables libfko3 libpcap0.8 hyperfine
PEER_DEBS := fwknop-server fwknop-client knockd
peers: deps ## fwknopd, fwknop and knockd for `make bench`, unpacked under target/peers
	@missing=$$(for p in $(PEER_LIBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p target/peers/debs target/peers/root
	@cd target/peers/debs && for p in $(PEER_DEBS); do ls $${p}_*.deb >/dev/null 2>&1 || apt-get download -q $$p; done
	@for d in target/peers/debs/*.deb; do dpkg -x $$d target/peers/root; done
	@target/peers/root/usr/sbin/fwknopd --version && target/peers/root/usr/sbin/knockd -V

# (An explicit --target keeps RUSTFLAGS off build scripts and proc macros.)
client-static: ## the knock client statically linked, as the package ships it: target/static/knock
	host=$$(rustc -vV | sed -n 's/^host: //p'); \
	CARGO_TARGET_DIR=target/static RUSTFLAGS="-C target-feature=+crt-static" \
	  cargo build --locked --release --no-default-features --bin knock --target $$host && \
	cp target/static/$$host/release/knock target/static/knock

bench: peers client-static ## knockgate, fwknopd and knockd side by side (target/bench/compare.{md,json})
	cargo bench --locked --bench compare -- --require-peers

bench-smoke: peers ## the same, a few repetitions each: proves the harness works (CI)
	cargo bench --locked --bench compare -- --quick --require-peers --out target/bench-smoke
