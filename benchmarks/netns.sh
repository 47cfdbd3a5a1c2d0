#!/usr/bin/env bash
# Two network namespaces joined by a veth pair with a tbf rate limit: two "nodes" whose only link
# is a slow one. Used by benchmarks/run.sh and benchmarks/compare.py --netns.
#
#   bash benchmarks/netns.sh up   [RATE]   # e.g. 100mbit (default)
#   bash benchmarks/netns.sh down
#   bash benchmarks/netns.sh check         # exit 0 when root + iproute2 + netns + tbf work
#
# Only the addresses of this private link are used: 10.200.0.1 (node 0, namespace ab-node0,
# interface abveth0) and 10.200.0.2 (node 1, ab-node1, abveth1). Nothing outside the namespaces
# is touched. tbf shapes the egress of each end, so each direction gets RATE. netem is not used
# (it does not work on these machines). The MTU is 9000 (jumbo frames, as in a cluster), so
# TCP/IP headers are < 1% of the bytes the kernel counts.
set -euo pipefail

NS0=${AB_NS0:-ab-node0}
NS1=${AB_NS1:-ab-node1}
IF0=${AB_IF0:-abveth0}
IF1=${AB_IF1:-abveth1}
ADDR0=${AB_ADDR0:-10.200.0.1}
ADDR1=${AB_ADDR1:-10.200.0.2}
MTU=${AB_MTU:-9000}

down() {
    ip netns del "$NS0" 2>/dev/null || true
    ip netns del "$NS1" 2>/dev/null || true
}

check() {
    if [ "$(id -u)" != 0 ]; then echo "netns: needs root (running as uid $(id -u))"; return 1; fi
    if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
        echo "netns: needs iproute2 (ip, tc): apt-get install iproute2"; return 1
    fi
    local probe="ab-probe-$$"
    if ! ip netns add "$probe" 2>/dev/null; then
        echo "netns: cannot create network namespaces here"; return 1
    fi
    ip netns del "$probe"
    return 0
}

up() {
    local rate=${1:-100mbit}
    down
    ip netns add "$NS0"
    ip netns add "$NS1"
    ip link add "$IF0" type veth peer name "$IF1"
    ip link set "$IF0" netns "$NS0"
    ip link set "$IF1" netns "$NS1"
    ip -n "$NS0" link set "$IF0" mtu "$MTU"
    ip -n "$NS1" link set "$IF1" mtu "$MTU"
    ip -n "$NS0" addr add "$ADDR0/24" dev "$IF0"
    ip -n "$NS1" addr add "$ADDR1/24" dev "$IF1"
    for ns in "$NS0" "$NS1"; do ip -n "$ns" link set lo up; done
    ip -n "$NS0" link set "$IF0" up
    ip -n "$NS1" link set "$IF1" up
    # burst must hold at least one MTU-sized packet; latency bounds the queue.
    tc -n "$NS0" qdisc add dev "$IF0" root tbf rate "$rate" burst 64kb latency 100ms
    tc -n "$NS1" qdisc add dev "$IF1" root tbf rate "$rate" burst 64kb latency 100ms
}

case "${1:-}" in
    up) shift; check && up "$@" ;;
    down) down ;;
    check) check ;;
    *) echo "usage: $0 up [RATE] | down | check" >&2; exit 2 ;;
esac
