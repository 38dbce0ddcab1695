//! What the dataplane asks the kernel about an interface (its MAC, its receive queues, its
//! state, its index, the XDP programs it runs and the XDP features its driver has) and the
//! socket options it sets, through sysfs, plain syscalls and libbpf's netlink queries.
//!
//! Owns these few reads and `setsockopt` calls; nothing here decides anything.

use std::ffi::{c_int, CString};
use std::os::fd::RawFd;
use std::path::PathBuf;

use super::{DataplaneError, Mac};

fn sys(interface: &str, what: &str) -> PathBuf {
    PathBuf::from("/sys/class/net").join(interface).join(what)
}

/// The interface's MAC address (`/sys/class/net/IF/address`).
pub fn mac(interface: &str) -> Result<Mac, DataplaneError> {
    let path = sys(interface, "address");
    let text = std::fs::read_to_string(&path).map_err(|e| DataplaneError::NoInterface {
        interface: interface.to_string(),
        reason: e.to_string(),
    })?;
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for b in &mut mac {
        *b = parts
            .next()
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .ok_or_else(|| DataplaneError::NoInterface {
                interface: interface.to_string(),
                reason: format!(
                    "{} holds `{}`, not a MAC address",
                    path.display(),
                    text.trim()
                ),
            })?;
    }
    Ok(mac)
}

/// How many receive queues the interface has (`/sys/class/net/IF/queues/rx-N`).
pub fn rx_queues(interface: &str) -> Result<u32, DataplaneError> {
    let dir =
        std::fs::read_dir(sys(interface, "queues")).map_err(|e| DataplaneError::NoInterface {
            interface: interface.to_string(),
            reason: e.to_string(),
        })?;
    let n = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    Ok(n as u32)
}

/// Whether the interface is up (`operstate` is not `down`): a veth whose peer is down
/// takes AF_XDP sockets but moves no frames.
pub fn is_down(interface: &str) -> bool {
    std::fs::read_to_string(sys(interface, "operstate")).is_ok_and(|s| s.trim() == "down")
}

/// The interface's index (`if_nametoindex`).
pub fn ifindex(interface: &str) -> std::io::Result<u32> {
    let name = CString::new(interface)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a NUL-terminated name that outlives the call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()),
        i => Ok(i),
    }
}

/// `struct bpf_xdp_query_opts` (libbpf 1.4).
#[repr(C)]
#[derive(Default)]
struct XdpQueryOpts {
    sz: usize,
    prog_id: u32,
    drv_prog_id: u32,
    hw_prog_id: u32,
    skb_prog_id: u32,
    attach_mode: u8,
    feature_flags: u64,
    xdp_zc_max_segs: u32,
    /// The tail padding, spelt out: libbpf refuses an opts struct with non-zero bytes past
    /// the fields it knows.
    tail: u32,
}

extern "C" {
    /// libbpf 1.4's (linked into libxdp-sys); -errno on failure.
    fn bpf_xdp_query(ifindex: c_int, flags: c_int, opts: *mut XdpQueryOpts) -> c_int;
}

/// `bpf_xdp_query` with an opts struct `sz` bytes long: libbpf fills only the fields that
/// fit, and asks the `netdev` generic netlink family for the XDP features only when
/// `feature_flags` fits (one more request, and a kernel before 6.3 has no such family).
fn xdp_query(ifindex: u32, sz: usize) -> std::io::Result<XdpQueryOpts> {
    let mut opts = XdpQueryOpts {
        sz,
        ..XdpQueryOpts::default()
    };
    // SAFETY: `opts` is a libbpf opts struct at least `sz` bytes long, exclusively borrowed;
    // libbpf writes only the fields within `sz`.
    let r = unsafe { bpf_xdp_query(ifindex as c_int, 0, &mut opts) };
    if r < 0 {
        Err(std::io::Error::from_raw_os_error(r.saturating_neg()))
    } else {
        Ok(opts)
    }
}

/// The XDP programs an interface runs, by mode, as ids (0: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpPrograms {
    /// In the driver (native).
    pub drv: u32,
    /// Generic (`XDP_FLAGS_SKB_MODE`), on the skb after the driver.
    pub skb: u32,
    /// Offloaded to the NIC.
    pub hw: u32,
}

impl XdpPrograms {
    /// The program that can hand the interface's frames to AF_XDP sockets: the native one,
    /// else the generic one (the kernel runs at most one of the two: `dev_xdp_attach` says
    /// "Native and generic XDP can't be active at the same time"; an offloaded program
    /// cannot redirect to a socket). 0: none.
    pub fn steering(&self) -> u32 {
        if self.drv != 0 {
            self.drv
        } else {
            self.skb
        }
    }
}

/// The XDP programs the interface `ifindex` runs (one netlink request: `RTM_GETLINK`).
pub fn xdp_programs(ifindex: u32) -> std::io::Result<XdpPrograms> {
    let o = xdp_query(ifindex, std::mem::offset_of!(XdpQueryOpts, feature_flags))?;
    Ok(XdpPrograms {
        drv: o.drv_prog_id,
        skb: o.skb_prog_id,
        hw: o.hw_prog_id,
    })
}

/// The `NETDEV_XDP_ACT_*` features of the interface `ifindex`'s driver (linux/netdev.h); 0
/// from a kernel that reports none (before 6.3).
pub fn xdp_features(ifindex: u32) -> std::io::Result<u64> {
    Ok(xdp_query(ifindex, std::mem::size_of::<XdpQueryOpts>())?.feature_flags)
}

/// `SO_BUSY_POLL`, `SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL_BUDGET` (asm-generic/socket.h).
const SO_BUSY_POLL: libc::c_int = 46;
const SO_PREFER_BUSY_POLL: libc::c_int = 69;
const SO_BUSY_POLL_BUDGET: libc::c_int = 70;

fn setsockopt(fd: RawFd, opt: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed with it; the kernel
    // only reads it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Turns on preferred busy polling for an AF_XDP socket (the kernel's
/// Documentation/networking/af_xdp.rst, "XDP_USE_NEED_WAKEUP" and busy polling): 20 µs
/// of busy polling per call, `budget` frames per poll.
pub fn busy_poll(fd: RawFd, budget: usize) -> std::io::Result<()> {
    setsockopt(fd, SO_PREFER_BUSY_POLL, 1)?;
    setsockopt(fd, SO_BUSY_POLL, 20)?;
    setsockopt(
        fd,
        SO_BUSY_POLL_BUDGET,
        budget.min(i32::MAX as usize) as libc::c_int,
    )
}

/// Drives the socket's receive side once without blocking: the wakeup `need_wakeup` asks
/// for, and with busy polling the call that runs the driver's poll.
pub fn kick_rx(fd: RawFd) {
    // SAFETY: a zero-length receive into no buffer; the kernel writes nothing.
    unsafe {
        libc::recvfrom(
            fd,
            std::ptr::null_mut(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
    }
}

/// Waits until one of `fds` can be read or `timeout_ms` passes.
pub fn wait_readable(fds: &mut [libc::pollfd], timeout_ms: i32) {
    // SAFETY: `fds` is a valid, exclusively borrowed array of its length.
    unsafe {
        libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms);
    }
}

/// A pollfd asking for readability of `fd`.
pub fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// `enum libbpf_print_level`: LIBBPF_WARN.
const LIBBPF_WARN: libc::c_int = 0;

type LibbpfPrint = unsafe extern "C" fn(
    level: libc::c_int,
    fmt: *const libc::c_char,
    ap: *mut libc::c_void,
) -> libc::c_int;

extern "C" {
    /// libbpf's (linked into libxdp-sys): where its messages go.
    fn libbpf_set_print(f: Option<LibbpfPrint>) -> Option<LibbpfPrint>;
    fn vfprintf(
        stream: *mut libc::FILE,
        fmt: *const libc::c_char,
        ap: *mut libc::c_void,
    ) -> libc::c_int;
    static mut stderr: *mut libc::FILE;
}

/// Prints libbpf's warnings and drops its information messages ("elf: skipping
/// unrecognized data section" for every program libxdp loads).
unsafe extern "C" fn libbpf_warnings(
    level: libc::c_int,
    fmt: *const libc::c_char,
    ap: *mut libc::c_void,
) -> libc::c_int {
    if level != LIBBPF_WARN {
        return 0;
    }
    // SAFETY: libbpf hands a printf format and its matching va_list, which vfprintf takes
    // as they are; stderr is the C library's own stream.
    unsafe { vfprintf(stderr, fmt, ap) }
}

/// Keeps libbpf to its warnings (call before opening sockets).
pub fn quiet_libbpf() {
    // SAFETY: installs a callback with the signature libbpf expects; nothing else is set.
    unsafe {
        libbpf_set_print(Some(libbpf_warnings));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_opts_are_libbpfs() {
        // libbpf 1.4's `struct bpf_xdp_query_opts`, with its `size_t :0` tail.
        assert_eq!(std::mem::size_of::<XdpQueryOpts>(), 48);
        assert_eq!(std::mem::offset_of!(XdpQueryOpts, feature_flags), 32);
        assert_eq!(std::mem::offset_of!(XdpQueryOpts, skb_prog_id), 20);
    }

    #[test]
    fn the_native_program_steers_else_the_generic_one() {
        let p = |drv, skb, hw| XdpPrograms { drv, skb, hw };
        assert_eq!(p(0, 0, 0).steering(), 0);
        assert_eq!(p(42, 0, 0).steering(), 42);
        assert_eq!(p(0, 43, 0).steering(), 43);
        assert_eq!(p(42, 0, 7).steering(), 42);
        assert_eq!(p(0, 0, 7).steering(), 0);
    }
}
