//! What the dataplane asks the kernel about an interface (its MAC, its receive queues, its
//! state) and the socket options it sets, all through sysfs and plain syscalls.
//!
//! Owns these few reads and `setsockopt` calls; nothing here decides anything.

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
