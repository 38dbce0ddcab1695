//! keepstate: a stateful edge firewall with nftables syntax and Linux conntrack semantics.
//!
//! The layers, top to bottom; each may call only the ones below it:
//!
//! ```text
//!   cli        clap subcommands; wires the library together, holds no policy
//!   dataplane  the live box: AF_XDP sockets, per-core workers and their health, ARP/ND/echo,
//!              the control socket, the lab, its demo and its soak; the only home of unsafe,
//!              threads and syscalls
//!   replay     offline replay: capture files -> engine with the capture's clock -> text
//!   config     the TOML configuration: rules file, ports, routes, conntrack settings
//!   engine     sans-IO: process(frame, ingress, now) -> Verdict; the one place that joins
//!              packets, the tracker and the classifier, in netfilter's hook order
//!   rules      rules file -> pest -> spanned AST -> checked -> lowered IR (rules::ir)
//!   classify   IR -> decision tree; `linear` is the obviously-right reference it is tested against
//!   conntrack  the connection tracker (Linux semantics, sans-IO): knows packets and time, never
//!              rules; NAT bindings, expectations, the FTP and SIP helpers (with their NAT)
//!   packet     frame bytes -> checked flow view (etherparse), NAT byte edits; depends on
//!              nothing of ours
//!   fuzz       the fuzz targets' bodies (cargo fuzz in fuzz/, replayed by a stable test)
//! ```
//!
//! Rules flow one way: text -> AST -> IR -> classifier. Packets flow one way: bytes -> packet
//! view -> conntrack -> classifier (per hook; NAT at its hooks) -> helpers -> verdict, with
//! the frame's edits (TTL, NAT, helpers' rewrites) made once the verdict is known. `rules` exports the IR and the
//! diagnostics; pest's `Rule` type never leaves `rules::parse`. `classify` knows the IR and a
//! packet's fields, never the parser.

pub mod classify;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod dataplane;
pub mod engine;
#[doc(hidden)]
pub mod fuzz;
pub mod packet;
pub mod replay;
pub mod rules;
