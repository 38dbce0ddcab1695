//! `keepstate trace` through the example home router, as a user runs it: the hooks a packet
//! passes, the rules it matches (with file:line) and the verdict.

use std::process::Command;

fn trace(packet: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_keepstate"))
        .args(["trace", "--rules", "examples/home-router.nft", packet])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The line number of the first line of the example containing `needle`.
fn line_of(needle: &str) -> usize {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/home-router.nft"
    ))
    .unwrap();
    text.lines().position(|l| l.contains(needle)).expect(needle) + 1
}

#[test]
fn lan_to_wan_is_forwarded_and_masqueraded() {
    let t = trace("tcp from 192.168.1.10:40000 to 198.51.100.7:443 iif lan oif wan");
    assert!(t.contains("hook prerouting:\n"), "{t}");
    assert!(t.contains("hook forward:\n"), "{t}");
    let fwd = format!(
        "home-router.nft:{}: iifname \"lan\" oifname \"wan\" accept",
        line_of("iifname \"lan\" oifname \"wan\"")
    );
    assert!(t.contains(&fwd), "{t}");
    let masq = format!(
        "home-router.nft:{}: oifname \"wan\" masquerade",
        line_of("oifname \"wan\" masquerade")
    );
    assert!(t.contains(&masq), "{t}");
    assert!(t.ends_with("verdict: accept\n"), "{t}");
}

#[test]
fn port_forward_is_translated_before_the_forward_hook() {
    let t = trace("tcp from 203.0.113.5:5555 to 198.51.100.1:8080 iif wan oif lan");
    assert!(
        t.contains("(destination translated: 192.168.1.10:80)"),
        "{t}"
    );
    assert!(
        t.contains("ip daddr 192.168.1.10 tcp dport 80 ct status dnat accept"),
        "{t}"
    );
    assert!(t.ends_with("verdict: accept\n"), "{t}");
}

#[test]
fn ssh_from_the_internet_is_dropped_by_policy() {
    let t = trace("tcp from 203.0.113.5:5555 to 198.51.100.1:22 iif wan");
    assert!(t.contains("hook input:\n"), "{t}");
    assert!(t.contains("=> policy drop"), "{t}");
    assert!(t.ends_with("verdict: drop\n"), "{t}");
    // The tree and the reference agree.
    let out = Command::new(env!("CARGO_BIN_EXE_keepstate"))
        .args([
            "trace",
            "--reference",
            "--rules",
            "examples/home-router.nft",
            "tcp from 203.0.113.5:5555 to 198.51.100.1:22 iif wan",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), t);
}

#[test]
fn established_replies_skip_nat_and_pass() {
    let t = trace(
        "tcp from 198.51.100.7:443 to 192.168.1.10:40000 iif wan oif lan flags ack ct established",
    );
    assert!(t.contains("nat chains are skipped"), "{t}");
    assert!(!t.contains("chain ip nat"), "{t}");
    assert!(t.ends_with("verdict: accept\n"), "{t}");
}

#[test]
fn ipv6_packets_do_not_see_ip_tables() {
    let t = trace("tcp from [2001:db8::5]:5555 to [2001:db8::1]:8080 iif wan oif lan");
    assert!(!t.contains("chain ip nat"), "{t}");
}

#[test]
fn a_bad_description_says_why() {
    let out = Command::new(env!("CARGO_BIN_EXE_keepstate"))
        .args([
            "trace",
            "--rules",
            "examples/home-router.nft",
            "tcp from 1.2.3.4 to 5.6.7.8:80",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("iif NAME"), "{e}");
}
