//! The XDP fast path's object and the layouts of its maps (src/dataplane/bpf/fastpath.bpf.c,
//! compiled by build.rs): what the workers write into `flows` for each direction of an
//! offloaded connection, and what the main loop reads back.
//!
//! XXX: not loaded yet. Still to do (issue 8): load the object with libbpf in place of
//! libxdp's default program (sockets opened with the program load inhibited, their fds in
//! `xsks`), fill `tx_ports`, mirror the engine's `FlowEvent`s into `flows`, read `packets`,
//! `bytes` and `last_seen` into `Engine::flow_account`, and attach `keepstate_pass` to the
//! lab hosts' veths (veth delivers redirected frames only to a peer running XDP).

/// The compiled BPF object (ELF).
pub static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fastpath.bpf.o"));

/// `struct flow_key`: the ingress ifindex and the tuple as the packet arrives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FlowKey {
    pub ifindex: u32,
    /// 4 or 6.
    pub l3: u8,
    pub proto: u8,
    pub pad: u16,
    /// IPv4 in the first four bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
}

/// `flow_value.nat` bits.
pub mod nat {
    pub const SRC: u8 = 0x1;
    pub const DST: u8 = 0x2;
    pub const SPORT: u8 = 0x4;
    pub const DPORT: u8 = 0x8;
}

/// `struct flow_value`: where the direction leaves and how it is rewritten; the counters the
/// program adds to atomically.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FlowValue {
    /// The egress ifindex (the key of `tx_ports`).
    pub tx_port: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub nat: u8,
    pub pad: [u8; 3],
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_ktime_get_ns`: CLOCK_MONOTONIC.
    pub last_seen: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_programs() {
        // The verifier's `ks=44 vs=80` for the `flows` map.
        assert_eq!(std::mem::size_of::<FlowKey>(), 44);
        assert_eq!(std::mem::size_of::<FlowValue>(), 80);
        assert_eq!(&OBJECT[..4], b"\x7fELF");
    }
}
