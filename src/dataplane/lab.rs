//! The lab: a throwaway network-namespace topology to run the appliance in, with `ip`.
//!
//! ```text
//!  PREFIX-lan                 PREFIX-fw (keepstate run)                PREFIX-wan
//!  eth0 192.168.1.10/24 ──── ks-lan  [port lan]   [port wan]  ks-wan ──── eth0 198.51.100.254/24
//!       fd00:1::10/64            no addresses in the kernel:                    fd00:2::254/64
//!  default via .1, fd00:1::1     keepstate owns them           lo 203.0.113.7/32, 2001:db8::7/128
//!                                                 192.168.1.0/24 via .1, fd00:1::/64 via fd00:2::1
//! ```
//!
//! The addresses are those of `examples/lab.toml` ([`LAN_HOST`] and so on). Every veth is
//! created inside its namespace (no name ever exists in the caller's namespace), with the
//! same number of queues on both ends. The hosts send real checksums (`ethtool -K eth0 tx
//! off`): veth otherwise hands on TCP and UDP with only the pseudo-header sum, which
//! conntrack with `checksum = true` calls INVALID. The hosts' IPv6 addresses skip duplicate
//! address detection (`nodad`), so they work at once; the firewall's kernel has IPv6 off.
//! The hosts' veths run the fast path object's pass-through program (`keepstate_pass`, loaded
//! by `ip link set ... xdpdrv`): veth delivers a frame the firewall's XDP program redirected
//! into it only when its peer runs XDP.
//!
//! The hosts' veths also get a queue (`pfifo limit 1000`), as a real host's NIC has one: veth
//! has none by default, and while the firewall's end runs XDP, a frame the host sends when the
//! firewall's receive ring (256 frames) is full is dropped (the host's `tx_dropped`). A burst
//! of a fast TCP download did that hundreds of times a minute, and a UDP datagram caught in
//! one was lost. With a queue, veth (Linux 6.16 and later) stops the queue instead and the
//! frame waits, as behind a real wire.
//!
//! Owns only namespaces and links it creates; `down` deletes exactly the namespaces of its
//! prefix.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The LAN host, the firewall's LAN and WAN addresses, the WAN host (the next hop of the
/// default route) and an address "on the internet" behind it.
pub const LAN_HOST: &str = "192.168.1.10";
pub const FW_LAN: &str = "192.168.1.1";
pub const FW_WAN: &str = "198.51.100.1";
pub const WAN_HOST: &str = "198.51.100.254";
pub const INTERNET: &str = "203.0.113.7";
pub const LAN_HOST6: &str = "fd00:1::10";
pub const FW_LAN6: &str = "fd00:1::1";
pub const FW_WAN6: &str = "fd00:2::1";
pub const WAN_HOST6: &str = "fd00:2::254";
pub const INTERNET6: &str = "2001:db8::7";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{command}` failed: {reason}")]
    Command { command: String, reason: String },
    #[error("lab prefix `{0}` must be 1 to 8 letters, digits or dashes")]
    Prefix(String),
    #[error("namespace `{0}` already exists: remove that lab first (`keepstate lab down`), or choose another --prefix")]
    Exists(String),
    #[error("the appliance did not start: {0}")]
    NoStart(String),
}

/// The namespaces of one lab.
#[derive(Clone, Debug)]
pub struct Lab {
    pub lan: String,
    pub fw: String,
    pub wan: String,
    /// The firewall's two veths, towards `lan` and towards `wan`.
    pub links: [String; 2],
}

impl Lab {
    pub fn named(prefix: &str) -> Result<Lab, LabError> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 8
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !ok {
            return Err(LabError::Prefix(prefix.to_string()));
        }
        Ok(Lab {
            lan: format!("{prefix}-lan"),
            fw: format!("{prefix}-fw"),
            wan: format!("{prefix}-wan"),
            links: ["ks-lan".into(), "ks-wan".into()],
        })
    }

    /// The same lab with the firewall's veths named `lan` and `wan` (as a kernel firewall
    /// running the same rules file needs them, since `iifname` names interfaces).
    pub fn with_links(mut self, lan: &str, wan: &str) -> Lab {
        self.links = [lan.into(), wan.into()];
        self
    }

    fn all(&self) -> [&str; 3] {
        [&self.lan, &self.fw, &self.wan]
    }

    /// Builds the topology, `queues` receive and transmit queues per veth. On failure,
    /// what was built is removed again.
    pub fn up(&self, queues: u32) -> Result<(), LabError> {
        // Never touch a lab that is already there: a failed `up` removes what it built.
        if let Some(ns) = self
            .all()
            .into_iter()
            .find(|ns| std::path::Path::new("/run/netns").join(ns).exists())
        {
            return Err(LabError::Exists(ns.to_string()));
        }
        let r = self.build(queues.max(1));
        if r.is_err() {
            self.down();
        }
        r
    }

    fn build(&self, queues: u32) -> Result<(), LabError> {
        for ns in self.all() {
            ip(&["netns", "add", ns])?;
            sh(ns, "ip link set lo up")?;
        }
        for k in ["all", "default"] {
            sh(
                &self.fw,
                &format!("sysctl -qw net.ipv6.conf.{k}.disable_ipv6=1"),
            )?;
        }
        let q = queues.to_string();
        // `ip` loads the object from a file; it is gone once the programs are attached.
        let file = tempfile::Builder::new()
            .prefix("keepstate-fastpath")
            .suffix(".o")
            .tempfile()
            .map_err(|e| LabError::Command {
                command: "write the fast path's object to a temporary file".into(),
                reason: e.to_string(),
            })?;
        std::fs::write(file.path(), super::fastpath::OBJECT).map_err(|e| LabError::Command {
            command: format!("write {}", file.path().display()),
            reason: e.to_string(),
        })?;
        let obj = file.path().display().to_string();
        for (link, host) in [(&self.links[0], &self.lan), (&self.links[1], &self.wan)] {
            ip(&[
                "-n",
                &self.fw,
                "link",
                "add",
                link,
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "netns",
                host,
            ])?;
            sh(&self.fw, &format!("ip link set {link} up"))?;
            sh(host, "ip link set eth0 up")?;
            sh(host, "ethtool -K eth0 tx off")?;
            // Back-pressure instead of drops when the firewall's ring is full (see above).
            sh(host, "tc qdisc replace dev eth0 root pfifo limit 1000")?;
            sh(
                host,
                &format!("ip link set dev eth0 xdpdrv object {obj} program keepstate_pass"),
            )?;
        }
        sh(&self.lan, &format!("ip addr add {LAN_HOST}/24 dev eth0"))?;
        sh(&self.lan, &format!("ip route add default via {FW_LAN}"))?;
        sh(&self.wan, &format!("ip addr add {WAN_HOST}/24 dev eth0"))?;
        sh(&self.wan, &format!("ip addr add {INTERNET}/32 dev lo"))?;
        sh(
            &self.wan,
            &format!("ip route add 192.168.1.0/24 via {FW_WAN}"),
        )?;
        sh(
            &self.lan,
            &format!("ip addr add {LAN_HOST6}/64 dev eth0 nodad"),
        )?;
        sh(&self.lan, &format!("ip -6 route add default via {FW_LAN6}"))?;
        sh(
            &self.wan,
            &format!("ip addr add {WAN_HOST6}/64 dev eth0 nodad"),
        )?;
        sh(&self.wan, &format!("ip addr add {INTERNET6}/128 dev lo"))?;
        sh(
            &self.wan,
            &format!("ip -6 route add fd00:1::/64 via {FW_WAN6}"),
        )?;
        Ok(())
    }

    /// Removes the namespaces (their processes are killed first); quiet about ones that
    /// are not there.
    pub fn down(&self) {
        for ns in self.all() {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }

    /// Starts `exe run --config cfg` in the firewall's namespace, behind `wrapper` (for
    /// example `taskset -c 1`), its stderr written to `log`, and waits up to 20 s until it
    /// says it runs and its control socket `control` exists. `ip netns exec` (and taskset)
    /// exec the program: the child's pid is the appliance's.
    pub fn start_appliance(
        &self,
        exe: &Path,
        cfg: &Path,
        log: &Path,
        wrapper: &[&str],
        control: &Path,
    ) -> Result<Child, LabError> {
        let command = format!("keepstate run --config {}", cfg.display());
        let file = std::fs::File::create(log).map_err(|e| LabError::Command {
            command: format!("create {}", log.display()),
            reason: e.to_string(),
        })?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.fw])
            .args(wrapper)
            .arg(exe)
            .arg("run")
            .arg("--config")
            .arg(cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(|e| LabError::Command {
                command,
                reason: e.to_string(),
            })?;
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            let said = std::fs::read_to_string(log).unwrap_or_default();
            if said.contains("keepstate: running") && control.exists() {
                return Ok(child);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(LabError::NoStart(format!("{status}: {}", said.trim())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(LabError::NoStart(
            "it did not say it runs within 20 s".into(),
        ))
    }

    /// How to use the lab, for `keepstate lab up`.
    pub fn usage(&self, config: &str) -> String {
        let (lan, fw, wan) = (&self.lan, &self.fw, &self.wan);
        format!(
            "lab up: {lan} (host {LAN_HOST}, {LAN_HOST6})
  -- {fw} (the firewall: port lan {FW_LAN} {FW_LAN6}, port wan {FW_WAN} {FW_WAN6})
  -- {wan} (host {WAN_HOST}, {WAN_HOST6}; the internet behind it: {INTERNET}, {INTERNET6})
run the firewall:
  ip netns exec {fw} keepstate run --config {config}
then, from other shells:
  ip netns exec {lan} ping -c 3 {INTERNET}     # forwarded, lan -> wan
  ip netns exec {lan} ping -c 3 {INTERNET6}
  ip netns exec {lan} ping -c 3 {FW_LAN}     # answered by the firewall
  ip netns exec {wan} python3 -m http.server 8000 --bind {INTERNET} &
  ip netns exec {lan} curl -o /dev/null http://{INTERNET}:8000/
  ip netns exec {wan} ping -c 3 -W 1 {LAN_HOST}     # dropped: nothing comes in unasked
  kill -HUP $(pidof keepstate)     # reload the rules file
  kill -USR1 $(pidof keepstate)     # print the counters
remove it with: keepstate lab down
"
        )
    }
}

/// The text of `examples/lab.toml` from `examples`, with `rules` (a path relative to
/// `examples`, or absolute) as an absolute path and the control socket at `control`.
pub fn config(examples: &Path, rules: &Path, control: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(examples.join("lab.toml"))?;
    let rules = std::path::absolute(examples.join(rules))?;
    Ok(text
        .replace(
            "rules = \"home-router.nft\"",
            &format!("rules = {:?}", rules.display().to_string()),
        )
        .replace(
            "control = \"/run/keepstate-lab.sock\"",
            &format!("control = {:?}", control.display().to_string()),
        ))
}

fn ip(args: &[&str]) -> Result<(), LabError> {
    run("ip", args)
}

/// Runs a command line (split on blanks) in namespace `ns`.
fn sh(ns: &str, cmd: &str) -> Result<(), LabError> {
    let mut args = vec!["netns", "exec", ns];
    args.extend(cmd.split_whitespace());
    run("ip", &args)
}

fn run(prog: &str, args: &[&str]) -> Result<(), LabError> {
    let command = format!("{prog} {}", args.join(" "));
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| LabError::Command {
            command: command.clone(),
            reason: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Command {
            command,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
