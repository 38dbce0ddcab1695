//! Reassembly through the public API, as the engine will drive it: frames parsed with
//! `parse_ethernet`, one `Reassembler` shared by worker threads, a fake clock.

use std::sync::Arc;

use etherparse::PacketBuilder;
use keepstate::packet::frag::{DropReason, FragConfig, Push, Reassembler};
use keepstate::packet::{checksum, parse_ethernet, parse_ip, Frame, L4};

const ETH4: [u8; 14] = [0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];

fn ipv4_checksum(h: &mut [u8]) {
    h[10] = 0;
    h[11] = 0;
    let c = etherparse::checksum::Sum16BitWords::new()
        .add_slice(h)
        .ones_complement();
    h[10..12].copy_from_slice(&c.to_ne_bytes());
}

/// A UDP datagram from 10.0.`src`.1 with IP id `id`, no DF, checksums valid.
fn datagram(src: u8, id: u16, len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i as u8) ^ src).collect();
    let mut ip = Vec::new();
    PacketBuilder::ipv4([10, 0, src, 1], [192, 0, 2, 1], 64)
        .udp(1000 + u16::from(src), 53)
        .write(&mut ip, &payload)
        .unwrap();
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[6] = 0;
    ip[7] = 0;
    ipv4_checksum(&mut ip[..20]);
    ip
}

/// The datagram cut into `size`-byte Ethernet-framed fragments.
fn fragments(ip: &[u8], size: usize) -> Vec<Vec<u8>> {
    let data = &ip[20..];
    let mut out = Vec::new();
    for (i, chunk) in data.chunks(size).enumerate() {
        let off = i * size;
        let more = off + chunk.len() < data.len();
        let mut h = ip[..20].to_vec();
        h[2..4].copy_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
        let fo = (off / 8) as u16 | if more { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&fo.to_be_bytes());
        ipv4_checksum(&mut h);
        let mut f = ETH4.to_vec();
        f.extend_from_slice(&h);
        f.extend_from_slice(chunk);
        out.push(f);
    }
    out
}

fn push(r: &Reassembler, frame: &[u8], now: u64) -> Push {
    let Frame::Ip(p) = parse_ethernet(frame) else {
        panic!("fixture does not parse")
    };
    r.push(&p, frame, now)
}

#[test]
fn shared_between_workers() {
    let r = Arc::new(Reassembler::default());
    let workers: Vec<_> = (0..2u8)
        .map(|w| {
            let r = Arc::clone(&r);
            std::thread::spawn(move || {
                let mut done = 0;
                for n in 0..200u16 {
                    // Both workers send fragments of datagrams from the same source with
                    // the same ids: the queues are shared, and each datagram completes
                    // exactly once, on whichever worker brings its last missing piece.
                    let ip = datagram(1, n, 2000);
                    let mut frames = fragments(&ip, 512);
                    if w == 1 {
                        frames.reverse();
                    }
                    for f in &frames {
                        match push(&r, f, 0) {
                            Push::Complete { reassembled, .. } => {
                                assert_eq!(reassembled, ip);
                                done += 1;
                            }
                            Push::Held | Push::Dropped(DropReason::Duplicate) => {}
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                }
                done
            })
        })
        .collect();
    let done: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let s = r.stats();
    // A datagram may complete, and a late copy from the other worker start a new queue.
    assert!(done >= 200, "{done}");
    assert_eq!(s.reasm_oks, done);
    assert_eq!(s.reasm_overlaps, 0);
}

#[test]
fn judge_the_reassembled_forward_the_originals() {
    let r = Reassembler::new(FragConfig::default());
    let ip = datagram(7, 0x4242, 4000);
    let frames = fragments(&ip, 1480);
    let order = [2, 0, 1];
    let mut result = None;
    for (t, &i) in order.iter().enumerate() {
        result = Some(push(&r, &frames[i], t as u64 * 1_000_000));
    }
    let Some(Push::Complete {
        reassembled,
        frames: out,
    }) = result
    else {
        panic!("not complete")
    };
    let Frame::Ip(p) = parse_ip(&reassembled) else {
        panic!()
    };
    let L4::Udp(u) = p.l4 else { panic!() };
    assert_eq!((u.sport, u.dport), (1007, 53));
    assert_eq!(checksum::verify(&p), Ok(()));
    let expected: Vec<_> = order.iter().map(|&i| frames[i].clone()).collect();
    assert_eq!(out, expected);
    assert_eq!(r.stats().reasm_reqds, 3);
}

#[test]
fn timeouts_with_a_fake_clock() {
    let r = Reassembler::default();
    let ip = datagram(3, 1, 3000);
    let frames = fragments(&ip, 1480);
    assert_eq!(push(&r, &frames[0], 0), Push::Held);
    assert_eq!(r.next_deadline(), Some(30_000_000_000));
    assert_eq!(r.expire(30_000_000_000), 1);
    assert_eq!(r.next_deadline(), None);
    let s = r.stats();
    assert_eq!((s.reasm_timeout, s.reasm_fails, s.queues), (1, 1, 0));
}
