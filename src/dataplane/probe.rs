//! `keepstate bench probe`: the latency prober of `keepstate bench veth`. ICMP echo requests
//! to one IPv4 address on a fixed schedule from a raw socket, each reply matched by
//! identifier and sequence number.
//!
//! A round trip runs from the send to the kernel's receipt of the reply, as iputils ping
//! measures it by default: the monotonic clock from the send to our read, less the time the
//! reply waited in the socket until we were scheduled (from its `SO_TIMESTAMPNS` receive
//! stamp). Under load that wait is the LAN host's scheduling, not the firewall's latency.
//!
//! Why our own: iputils ping busy-waits with `sched_yield` whenever its next send is due
//! within a clock tick (1000/HZ ms: 4 ms with this kernel's `CONFIG_HZ=250`), so at the
//! bench's 5 ms interval it spins through most of every interval; perf showed it using
//! 20–66 % of a core. That steals CPU from the generator and, since the bench counts the
//! prober's CPU time as the firewall's (`bench::cpu_others` says why), inflated every
//! mode's CPU per packet. This prober sleeps in `ppoll(2)` between sends and replies: a few
//! syscalls per probe.
//!
//! Output, one line per reply and a summary, written by [`reply_line`] and [`summary_line`]
//! and read back by [`rtts_ms`] (the bench's parser lives here, beside its writer):
//!
//! ```text
//! seq=0 time=0.412 ms
//! seq=1 time=0.388 ms
//! sent 2 received 2
//! ```
//!
//! A reply later than the timeout counts as lost, as does a request the kernel would not
//! take (the summary's `sent` leaves those out; the first error goes to stderr).
//!
//! Owns one raw ICMP socket; knows nothing of the firewall or the bench's namespaces.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant, SystemTime};

use super::wire;

/// ICMP types (RFC 792): `ICMP_ECHOREPLY`, `ICMP_ECHO`.
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
/// `IPPROTO_ICMP`.
const PROTO_ICMP: u8 = 1;
/// An echo request: the 8-byte ICMP header and 56 bytes of data, ping's default size.
const REQUEST_LEN: usize = 64;
/// What a request carries after its header: a tag that tcpdump shows, then zeros.
const TAG: &[u8] = b"keepstate probe";

/// One prober run.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSpec {
    pub dst: Ipv4Addr,
    pub count: u32,
    /// From one send to the next; the schedule is fixed, not paced by the replies.
    pub interval: Duration,
    /// How long a request waits for its reply, the last one included.
    pub timeout: Duration,
}

/// What a run sent and got back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub sent: u32,
    pub received: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot open a raw ICMP socket (needs root or CAP_NET_RAW): {0}")]
    Socket(io::Error),
    #[error("the prober's ppoll failed: {0}")]
    Poll(io::Error),
    #[error("the prober's recv failed: {0}")]
    Recv(io::Error),
    #[error("cannot write the prober's output: {0}")]
    Output(io::Error),
}

/// Writes the echo request `seq` of identifier `id` into `out`, checksum included.
fn echo_request(id: u16, seq: u16, out: &mut [u8; REQUEST_LEN]) {
    out.fill(0);
    out[0] = ICMP_ECHO_REQUEST;
    out[4..6].copy_from_slice(&id.to_be_bytes());
    out[6..8].copy_from_slice(&seq.to_be_bytes());
    out[8..8 + TAG.len()].copy_from_slice(TAG);
    let c = wire::checksum(0, out.as_slice());
    out[2..4].copy_from_slice(&c.to_be_bytes());
}

/// The identifier and sequence number of an echo reply from `from`, as a raw socket hands
/// it over (the IPv4 header first). `None` for anything else, a bad checksum included: the
/// raw socket sees every ICMP packet the host receives.
fn echo_reply(packet: &[u8], from: Ipv4Addr) -> Option<(u16, u16)> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    if packet[0] >> 4 != 4 || ihl < 20 || *packet.get(9)? != PROTO_ICMP {
        return None;
    }
    let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
    let total = usize::from(u16::from_be_bytes(packet.get(2..4)?.try_into().ok()?));
    let icmp = packet.get(ihl..total)?;
    if Ipv4Addr::from(src) != from
        || icmp.len() < 8
        || icmp[0] != ICMP_ECHO_REPLY
        || icmp[1] != 0
        || wire::checksum(0, icmp) != 0
    {
        return None;
    }
    Some((
        u16::from_be_bytes([icmp[4], icmp[5]]),
        u16::from_be_bytes([icmp[6], icmp[7]]),
    ))
}

/// The line of one reply: probe `seq` (0 is the first) came back after `rtt`.
pub fn reply_line(seq: u32, rtt: Duration) -> String {
    format!("seq={seq} time={:.3} ms", rtt.as_secs_f64() * 1e3)
}

pub fn summary_line(s: Summary) -> String {
    format!("sent {} received {}", s.sent, s.received)
}

/// The round-trip times (ms) in a prober's output, in the order the replies came.
pub fn rtts_ms(text: &str) -> Vec<f64> {
    text.lines()
        .filter(|l| l.starts_with("seq="))
        .filter_map(|l| l.split(" time=").nth(1)?.strip_suffix(" ms")?.parse().ok())
        .collect()
}

/// A raw ICMP socket (raw(7), `IPPROTO_ICMP`): requests go out with the kernel's IPv4
/// header, and every ICMP packet the host receives comes in with its IPv4 header.
struct RawIcmp(OwnedFd);

impl RawIcmp {
    fn open() -> io::Result<RawIcmp> {
        // SAFETY: socket has no preconditions; the result is checked before it is owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let sock = RawIcmp(unsafe { OwnedFd::from_raw_fd(fd) });
        // A receive timestamp with every packet (socket(7), SO_TIMESTAMPNS).
        let on: libc::c_int = 1;
        // SAFETY: `on` is a valid c_int of the length given for the whole call.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                std::ptr::from_ref(&on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    fn send_to(&self, packet: &[u8], dst: Ipv4Addr) -> io::Result<()> {
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `packet` and `addr` are valid for the lengths given for the whole call.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The next packet waiting, without blocking, and when the kernel received it; `None`
    /// when there is none.
    fn try_recv<'b>(&self, buf: &'b mut [u8]) -> io::Result<Option<Received<'b>>> {
        // u64s: the control messages' headers want alignment.
        let mut control = [0u64; 8];
        loop {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: msghdr is plain integers and pointers, for which zero is a valid value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            // SAFETY: `msg` points at `iov` (all of `buf`) and at `control`, both valid for
            // writes of the lengths given, for the whole call.
            let n = unsafe { libc::recvmsg(self.0.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
            if let Ok(n) = usize::try_from(n) {
                let stamp = rx_stamp(&msg);
                return Ok(buf.get(..n).map(|packet| Received { packet, stamp }));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(None),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
    }

    /// Sleeps until a packet is waiting or `timeout` has passed. `ppoll`, not `poll`: its
    /// timeout has nanoseconds, so a 5 ms schedule is kept without rounding to whole ms.
    fn wait(&self, timeout: Duration) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
            tv_nsec: timeout.subsec_nanos().into(),
        };
        // SAFETY: one valid pollfd, a valid timespec and no signal mask, for the whole call.
        let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// A packet read from the socket.
struct Received<'b> {
    packet: &'b [u8],
    /// When the kernel received it (CLOCK_REALTIME), if it said.
    stamp: Option<SystemTime>,
}

/// The `SCM_TIMESTAMPNS` control message of a `recvmsg`, if there is one.
fn rx_stamp(msg: &libc::msghdr) -> Option<SystemTime> {
    // SAFETY: `msg` was filled by recvmsg: `msg_controllen` bytes of its control buffer hold
    // whole control messages, which the CMSG macros walk without leaving it; the data of a
    // SCM_TIMESTAMPNS message is one timespec, read unaligned.
    let ts = unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        loop {
            if c.is_null() {
                return None;
            }
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                break std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    };
    let d = Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    );
    SystemTime::UNIX_EPOCH.checked_add(d)
}

/// The round trip `rtt` (send to read, monotonic) less the time the reply waited in the
/// socket: from the kernel's receive `stamp` to our `read`, both CLOCK_REALTIME, a short
/// span in which a step of the clock is unlikely. A wait that makes no sense (the clock
/// stepped back, or longer than the whole round trip) is not taken off.
fn less_wait(rtt: Duration, stamp: Option<SystemTime>, read: SystemTime) -> Duration {
    stamp
        .and_then(|s| read.duration_since(s).ok())
        .filter(|w| *w <= rtt)
        .map_or(rtt, |w| rtt - w)
}

/// A request still waiting for its reply.
struct Pending {
    seq: u32,
    sent: Instant,
}

/// Sends `spec.count` echo requests to `spec.dst`, one every `spec.interval`, and writes a
/// line per reply to `out` as it comes; after the last send, waits up to `spec.timeout` for
/// the replies still out. The summary line is the caller's to write.
pub fn run(spec: &ProbeSpec, out: &mut dyn Write) -> Result<Summary, ProbeError> {
    let sock = RawIcmp::open().map_err(ProbeError::Socket)?;
    // The kernel does not keep the identifier of a raw socket's requests apart from other
    // processes' (a ping socket would): the pid tells ours from a ping running beside us.
    let id = (std::process::id() & 0xffff) as u16;
    let mut request = [0u8; REQUEST_LEN];
    let mut buf = [0u8; 2048];
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut summary = Summary {
        sent: 0,
        received: 0,
    };
    let mut send_error = None;
    let mut next = 0u32;
    let mut due = Instant::now();
    loop {
        let now = Instant::now();
        while pending
            .front()
            .is_some_and(|p| now.duration_since(p.sent) >= spec.timeout)
        {
            pending.pop_front();
        }
        if next < spec.count && now >= due {
            echo_request(id, next as u16, &mut request);
            let sent = Instant::now();
            match sock.send_to(&request, spec.dst) {
                Ok(()) => {
                    summary.sent += 1;
                    pending.push_back(Pending { seq: next, sent });
                }
                Err(e) => {
                    send_error.get_or_insert(e);
                }
            }
            next += 1;
            // A fixed schedule, but no burst to catch up after a stall of more than one
            // interval (descheduled under load): that would measure our own queueing.
            due += spec.interval;
            if due <= now {
                due = now + spec.interval;
            }
        }
        let expiry = pending.front().map(|p| p.sent + spec.timeout);
        let wake = match (next < spec.count, expiry) {
            (true, Some(e)) => due.min(e),
            (true, None) => due,
            (false, Some(e)) => e,
            (false, None) => break,
        };
        sock.wait(wake.saturating_duration_since(Instant::now()))
            .map_err(ProbeError::Poll)?;
        while let Some(r) = sock.try_recv(&mut buf).map_err(ProbeError::Recv)? {
            let (at, wall) = (Instant::now(), SystemTime::now());
            let Some((rid, rseq)) = echo_reply(r.packet, spec.dst) else {
                continue;
            };
            if rid != id {
                continue;
            }
            // Sequence numbers wrap at 65536: the oldest request still out with these low
            // bits is the one answered (the timeout drops the older ones first).
            let Some(p) = pending
                .iter()
                .position(|p| p.seq as u16 == rseq)
                .and_then(|i| pending.remove(i))
            else {
                continue;
            };
            let rtt = less_wait(at.duration_since(p.sent), r.stamp, wall);
            if rtt < spec.timeout {
                summary.received += 1;
                writeln!(out, "{}", reply_line(p.seq, rtt)).map_err(ProbeError::Output)?;
            }
        }
    }
    if let Some(e) = send_error {
        eprintln!(
            "keepstate bench probe: {} of {} requests to {} not sent; the first error: {e}",
            spec.count - summary.sent,
            spec.count,
            spec.dst
        );
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: u16, seq: u16) -> [u8; REQUEST_LEN] {
        let mut r = [0u8; REQUEST_LEN];
        echo_request(id, seq, &mut r);
        r
    }

    #[test]
    fn echo_request_checksum() {
        for (id, seq) in [(0, 0), (0x1234, 1), (0xffff, 0xffff), (42, 65000)] {
            let r = request(id, seq);
            // The whole message sums to 0xffff: the checksum over it, checksum included, is 0.
            assert_eq!(wire::checksum(0, &r), 0, "id {id} seq {seq}");
            // And it is what etherparse computes for the same echo request.
            let want = etherparse::Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id, seq })
                .calc_checksum(&r[8..]);
            assert_eq!(u16::from_be_bytes([r[2], r[3]]), want, "id {id} seq {seq}");
        }
        // Worked by hand: type 8, id 0x0001, seq 0x0002, data zero but for the tag.
        let r = request(1, 2);
        let mut sum = 0x0800u32 + 0x0001 + 0x0002;
        for w in TAG.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(u16::from_be_bytes([r[2], r[3]]), !(sum as u16));
    }

    /// An echo reply as the raw socket returns it: IPv4 header, then the ICMP message.
    fn reply_packet(from: [u8; 4], id: u16, seq: u16) -> Vec<u8> {
        let b =
            etherparse::PacketBuilder::ipv4(from, [192, 168, 1, 10], 63).icmpv4_echo_reply(id, seq);
        let mut p = Vec::new();
        b.write(&mut p, &request(id, seq)[8..]).unwrap();
        p
    }

    #[test]
    fn echo_replies_are_matched() {
        let from = Ipv4Addr::new(203, 0, 113, 7);
        let p = reply_packet(from.octets(), 0x4321, 17);
        assert_eq!(echo_reply(&p, from), Some((0x4321, 17)));
        // From elsewhere, cut short, a bad checksum, a request rather than a reply: not ours.
        assert_eq!(echo_reply(&p, Ipv4Addr::new(203, 0, 113, 8)), None);
        assert_eq!(echo_reply(&p[..26], from), None);
        assert_eq!(echo_reply(&[], from), None);
        let mut bad = p.clone();
        bad[30] ^= 1;
        assert_eq!(echo_reply(&bad, from), None);
        let mut req = p.clone();
        req[20] = ICMP_ECHO_REQUEST;
        assert_eq!(echo_reply(&req, from), None);
        // Trailing bytes past the IPv4 total length are not part of the message.
        let mut long = p.clone();
        long.extend_from_slice(&[0xaa; 4]);
        assert_eq!(echo_reply(&long, from), Some((0x4321, 17)));
    }

    #[test]
    fn the_wait_in_the_socket_is_taken_off() {
        let ms = Duration::from_millis;
        let read = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(less_wait(ms(5), Some(read - ms(3)), read), ms(2));
        assert_eq!(less_wait(ms(5), Some(read), read), ms(5));
        // No stamp, a stamp after the read (the clock stepped back), or one before the send.
        assert_eq!(less_wait(ms(5), None, read), ms(5));
        assert_eq!(less_wait(ms(5), Some(read + ms(1)), read), ms(5));
        assert_eq!(less_wait(ms(5), Some(read - ms(6)), read), ms(5));
    }

    #[test]
    fn output_is_read_back() {
        let mut text = String::new();
        for (seq, us) in [(0, 412), (1, 1_388), (3, 12_000)] {
            text += &reply_line(seq, Duration::from_micros(us));
            text.push('\n');
        }
        text += &summary_line(Summary {
            sent: 4,
            received: 3,
        });
        text.push('\n');
        assert_eq!(
            text,
            "seq=0 time=0.412 ms\nseq=1 time=1.388 ms\nseq=3 time=12.000 ms\nsent 4 received 3\n"
        );
        assert_eq!(rtts_ms(&text), vec![0.412, 1.388, 12.0]);
        assert!(rtts_ms("keepstate bench probe: 1 of 4 requests not sent\n").is_empty());
    }
}
