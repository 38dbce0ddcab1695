//! The traffic generator of `keepstate bench veth`: pre-built 60-byte frames (UDP datagrams,
//! or TCP SYNs for connection churn) sent from a transmit-only AF_XDP socket as fast as the
//! kernel takes them.
//!
//! Why our own: trafgen, the usual choice, saturates a core of this machine by itself (see
//! ../shared/notes/veth-benchmarking.md). Here the frames never leave the UMEM: each send
//! rewrites the flow's source port and address in place and patches both checksums
//! incrementally (RFC 1624), so the generator's cost per frame is a few stores and the
//! kernel's `sendto`, which builds the skb and runs the veth's receive side.
//!
//! The socket is bound with libxdp's program load inhibited: the sending interface keeps no
//! XDP program, and its kernel stack still answers ARP for the host (the firewall needs the
//! host's address to forward replies).
//!
//! Owns one socket and its UMEM; knows nothing of the firewall.

use std::net::Ipv4Addr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use xsk_rs::config::{BindFlags, FrameSize, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
use xsk_rs::{FrameDesc, Socket, Umem};

use super::wire::Mac;

/// What the frames carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// 64-byte UDP datagrams (60 bytes on the wire without the FCS).
    Udp,
    /// TCP SYNs, each from the next flow: a new connection per frame.
    Syn,
}

/// One generator run.
#[derive(Clone, Debug)]
pub struct GenSpec {
    pub interface: String,
    pub queue: u32,
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: Ipv4Addr,
    /// The first destination address: flow `i` goes from source port `1024 + i % PORTS`
    /// to `dst + i / PORTS` (so that many flows through one masquerading address never
    /// run out of ports: each destination has a port space of its own).
    pub dst: Ipv4Addr,
    pub dport: u16,
    /// Distinct flows, sent in turn.
    pub flows: u32,
    pub traffic: Traffic,
    pub duration: Duration,
}

/// Source ports per source address: 1024..=65535.
pub const PORTS: u32 = 64512;
const FRAME_LEN: usize = 60;
const FRAMES: u32 = 4096;
const RING: u32 = 2048;
const BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("cannot set up the generator's UMEM: {0}")]
    Umem(String),
    #[error("cannot open a transmit socket on `{interface}` queue {queue}: {reason}")]
    Socket {
        interface: String,
        queue: u32,
        reason: String,
    },
    #[error("the generator's sendto failed: {0}")]
    Send(std::io::Error),
}

/// What was sent.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub frames: u64,
    pub elapsed: Duration,
}

/// The template frame of flow 0 and, for flow `i`, the bytes to patch.
pub struct Template {
    frame: [u8; FRAME_LEN],
    /// Offsets of the L4 checksum and the source port in the frame.
    l4_csum: usize,
    traffic: Traffic,
    dst: u32,
}

const IP: usize = 14;
const SPORT: usize = IP + 20;

impl Template {
    pub fn new(spec: &GenSpec) -> Template {
        let mut f = [0u8; FRAME_LEN];
        f[0..6].copy_from_slice(&spec.dst_mac);
        f[6..12].copy_from_slice(&spec.src_mac);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let (proto, l4_len) = match spec.traffic {
            Traffic::Udp => (17u8, FRAME_LEN - SPORT),
            Traffic::Syn => (6u8, 20),
        };
        let total = (20 + l4_len) as u16;
        let ip = &mut f[IP..IP + 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&spec.src.octets());
        ip[16..20].copy_from_slice(&spec.dst.octets());
        let c = !fold(sum(&f[IP..IP + 20]));
        f[IP + 10..IP + 12].copy_from_slice(&c.to_be_bytes());
        let l4 = SPORT;
        f[l4..l4 + 2].copy_from_slice(&1024u16.to_be_bytes());
        f[l4 + 2..l4 + 4].copy_from_slice(&spec.dport.to_be_bytes());
        let l4_csum = match spec.traffic {
            Traffic::Udp => {
                f[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                f[l4 + 8..].copy_from_slice(b"keepstate bench ve");
                l4 + 6
            }
            Traffic::Syn => {
                f[l4 + 4..l4 + 8].copy_from_slice(&0x6b73_0001u32.to_be_bytes()); // seq
                f[l4 + 12] = 5 << 4;
                f[l4 + 13] = 0x02; // SYN
                f[l4 + 14..l4 + 16].copy_from_slice(&64240u16.to_be_bytes());
                l4 + 16
            }
        };
        let mut pseudo = sum(&f[IP + 12..IP + 20]) + proto as u32 + l4_len as u32;
        pseudo += sum(&f[l4..l4 + l4_len]);
        let c = !fold(pseudo);
        let c = if c == 0 && spec.traffic == Traffic::Udp {
            0xffff
        } else {
            c
        };
        f[l4_csum..l4_csum + 2].copy_from_slice(&c.to_be_bytes());
        Template {
            frame: f,
            l4_csum,
            traffic: spec.traffic,
            dst: u32::from(spec.dst),
        }
    }

    /// Writes flow `i`'s frame into `out` (at least 60 bytes).
    pub fn write(&self, i: u32, out: &mut [u8]) {
        let out = &mut out[..FRAME_LEN];
        out.copy_from_slice(&self.frame);
        let port = 1024 + (i % PORTS) as u16;
        let addr = self.dst.wrapping_add(i / PORTS);
        // Differences from the template, as one's complement words (RFC 1624, eqn. 3).
        let d_addr =
            word_delta(self.dst >> 16, addr >> 16) + word_delta(self.dst & 0xffff, addr & 0xffff);
        let d_port = word_delta(1024, port as u32);
        out[SPORT..SPORT + 2].copy_from_slice(&port.to_be_bytes());
        out[IP + 16..IP + 20].copy_from_slice(&addr.to_be_bytes());
        patch(out, IP + 10, d_addr);
        let c = patch(out, self.l4_csum, d_addr + d_port);
        if c == 0 && self.traffic == Traffic::Udp {
            out[self.l4_csum..self.l4_csum + 2].copy_from_slice(&0xffffu16.to_be_bytes());
        }
    }
}

fn sum(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// `~old + new` for one 16-bit word, unfolded.
fn word_delta(old: u32, new: u32) -> u32 {
    (!(old as u16)) as u32 + (new & 0xffff)
}

/// Applies `delta` to the checksum at `at` (HC' = ~(~HC + ~m + m')); returns the new value.
fn patch(f: &mut [u8], at: usize, delta: u32) -> u16 {
    let hc = u16::from_be_bytes([f[at], f[at + 1]]);
    let c = !fold((!hc) as u32 + delta);
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
    c
}

/// Sends until `spec.duration` has passed; returns the frames the kernel completed.
pub fn run(spec: &GenSpec) -> Result<Sent, GenError> {
    let umem_err = |e: &dyn std::fmt::Display| GenError::Umem(e.to_string());
    let ring = QueueSize::new(RING).map_err(|e| umem_err(&e))?;
    let umem_cfg = UmemConfig::builder()
        .frame_size(FrameSize::new(2048).map_err(|e| umem_err(&e))?)
        .fill_queue_size(ring)
        .comp_queue_size(ring)
        .build()
        .map_err(|e| umem_err(&e))?;
    let frames = NonZeroU32::new(FRAMES).ok_or_else(|| GenError::Umem("no frames".into()))?;
    let (umem, mut free) = Umem::new(umem_cfg, frames, false).map_err(|e| umem_err(&e))?;
    let sock_cfg = SocketConfig::builder()
        .rx_queue_size(ring)
        .tx_queue_size(ring)
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(BindFlags::XDP_COPY)
        .build();
    let sock_err = |reason: String| GenError::Socket {
        interface: spec.interface.clone(),
        queue: spec.queue,
        reason,
    };
    let name = spec
        .interface
        .parse()
        .map_err(|e: std::ffi::NulError| sock_err(e.to_string()))?;
    // SAFETY: the socket is this process's only one on the UMEM, bound once.
    let (mut tx, _rx, rings) = unsafe { Socket::new(sock_cfg, &umem, &name, spec.queue) }
        .map_err(|e| sock_err(format!("{e:?}")))?;
    let (_fq, mut cq) = rings.ok_or_else(|| sock_err("libxdp returned no rings".into()))?;
    let template = Template::new(spec);
    let flows = spec.flows.max(1);
    let mut next = 0u32;
    let mut done = vec![FrameDesc::default(); BATCH];
    let mut completed = 0u64;
    let mut in_flight = 0usize;
    let start = Instant::now();
    let mut rounds = 0u32;
    loop {
        rounds = rounds.wrapping_add(1);
        if rounds % 256 == 0 && start.elapsed() >= spec.duration {
            break;
        }
        // SAFETY: completed descriptors name frames the kernel has finished with.
        let n = unsafe { cq.consume(&mut done) };
        completed += n as u64;
        in_flight -= n;
        free.extend_from_slice(&done[..n]);
        let take = free.len().min(BATCH);
        if take > 0 {
            let from = free.len() - take;
            for d in &mut free[from..] {
                // SAFETY: a free frame is ours alone until it is produced on the tx ring.
                let mut data = unsafe { umem.data_mut(d) };
                let mut cur = data.cursor();
                cur.set_pos(0);
                let mut buf = [0u8; FRAME_LEN];
                template.write(next, &mut buf);
                std::io::Write::write_all(&mut cur, &buf)
                    .map_err(|e| GenError::Umem(e.to_string()))?;
                next = (next + 1) % flows;
            }
            // SAFETY: the frames were written above and are handed to the kernel here.
            let sent = unsafe { tx.produce(&free[from..]) };
            in_flight += sent;
            free.truncate(free.len() - sent);
        }
        if let Err(e) = tx.wakeup() {
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::ENOBUFS) => {}
                _ => return Err(GenError::Send(e)),
            }
        }
    }
    let elapsed = start.elapsed();
    // Let what is queued finish so that every counted frame was really sent.
    let end = Instant::now() + Duration::from_millis(200);
    while in_flight > 0 && Instant::now() < end {
        let _ = tx.wakeup();
        // SAFETY: as above.
        let n = unsafe { cq.consume(&mut done) };
        completed += n as u64;
        in_flight -= n;
    }
    Ok(Sent {
        frames: completed,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(traffic: Traffic) -> GenSpec {
        GenSpec {
            interface: "eth0".into(),
            queue: 0,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: Ipv4Addr::new(192, 168, 1, 10),
            dst: Ipv4Addr::new(203, 0, 113, 7),
            dport: 9,
            flows: 1 << 20,
            traffic,
            duration: Duration::ZERO,
        }
    }

    /// Every patched frame has the checksums a from-scratch computation gives.
    #[test]
    fn patched_frames_have_correct_checksums() {
        for traffic in [Traffic::Udp, Traffic::Syn] {
            let t = Template::new(&spec(traffic));
            for i in [0, 1, 77, PORTS - 1, PORTS, 3 * PORTS + 12345, (1 << 20) - 1] {
                let mut f = [0u8; FRAME_LEN];
                t.write(i, &mut f);
                let p = etherparse::SlicedPacket::from_ethernet(&f).expect("parses");
                let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
                    panic!("not IPv4")
                };
                let h = ip.header().to_header();
                assert_eq!(h.header_checksum, h.calc_header_checksum(), "flow {i}");
                let want_dst = Ipv4Addr::new(203, 0, 113, 7 + (i / PORTS) as u8);
                assert_eq!(Ipv4Addr::from(h.destination), want_dst);
                assert_eq!(Ipv4Addr::from(h.source), Ipv4Addr::new(192, 168, 1, 10));
                match p.transport {
                    Some(etherparse::TransportSlice::Udp(u)) => {
                        assert_eq!(u.source_port(), 1024 + (i % PORTS) as u16);
                        let want = u
                            .to_header()
                            .calc_checksum_ipv4(&h, u.payload())
                            .expect("checksum");
                        assert_eq!(u.checksum(), want, "udp flow {i}");
                    }
                    Some(etherparse::TransportSlice::Tcp(t)) => {
                        assert!(t.syn() && !t.ack());
                        assert_eq!(t.source_port(), 1024 + (i % PORTS) as u16);
                        let want = t
                            .to_header()
                            .calc_checksum_ipv4(&h, t.payload())
                            .expect("checksum");
                        assert_eq!(t.checksum(), want, "tcp flow {i}");
                    }
                    other => panic!("transport {other:?}"),
                }
            }
        }
    }
}
