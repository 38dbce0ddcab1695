#!/usr/bin/env bash
# Installs what keepstate's build, demo and tests need on a fresh Debian machine that has only
# the Rust toolchain. Idempotent: packages already present are skipped, and apt-get runs only
# when something is missing. Needs root for apt-get (CI and the lab machines run as root).
set -euo pipefail

# nftables: the reference the tests compare against (nft); iproute2: ip netns for those tests;
# conntrack, tcpdump, iputils-ping, ethtool: the kernel differential test of replay
# (tests/netns_conntrack.rs) reads `conntrack -L`, captures the router's interfaces, pings
# through it and turns off checksum offload so the captured checksums are real.
# clang llvm libelf-dev zlib1g-dev libpcap-dev pkg-config m4 gcc-multilib: xsk-rs builds libxdp
# and libbpf from source for the AF_XDP dataplane (clang compiles libxdp's BPF programs);
# curl, python3: the live dataplane test (tests/netns_dataplane.rs) downloads from a Python
# http.server through the firewall with curl; python3-pyftpdlib: the FTP server of
# `keepstate lab demo` (the demo finds it with Debian's python3 when python3 is another one);
# sip-tester: sipp, the phone and the provider of the demo's SIP call (it plays the G.711
# sample the package ships as RTP).
packages=(nftables iproute2 conntrack tcpdump iputils-ping ethtool
	clang llvm libelf-dev zlib1g-dev libpcap-dev pkg-config m4 gcc-multilib make
	curl python3 python3-pyftpdlib sip-tester)

missing=()
for p in "${packages[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing+=("$p")
	fi
done

if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "setup: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
		echo "setup: continuing; tests that need them will say they are skipped" >&2
	else
		echo "setup: installing ${missing[*]}"
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -qq
		apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	fi
fi
