//! Connection tracking helpers: the protocol parsers that find, inside a control connection,
//! the connections it is about to open (FTP data, SIP media), as the kernel's
//! `nf_conntrack_ftp.c` and `nf_conntrack_sip.c` do.
//!
//! A connection's helper is attached by rules (`ct helper set`), never by port. Each helper
//! keeps its per-connection state in [`HelpState`] on the connection, and creates
//! expectations in [`super::expect`].

pub mod ftp;
pub mod sip;

use super::expect::ExpectError;

/// What the helper decided for a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Help {
    Accept,
    /// Accept, with the payload rewritten (a NAT helper): the caller makes the edit and the
    /// sequence adjustment.
    Mangle(Mangle),
    /// The kernel drops the segment (`NF_DROP`): a partial match, or the expectation could
    /// not be added.
    Drop(HelpDrop),
}

#[derive(thiserror::Error, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelpDrop {
    #[error("nf_ct_ftp: partial matching of `{0:?}'")]
    FtpPartial(ftp::FtpKind),
    #[error("cannot add expectation: {0}")]
    Expect(ExpectError),
    #[error("nf_ct_sip: {0}")]
    Sip(&'static str),
}

/// A payload rewrite (`nf_nat_mangle_tcp_packet`): `len` bytes at `offset` (from the start
/// of the IP packet) become `text`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mangle {
    pub offset: usize,
    pub len: usize,
    pub text: Vec<u8>,
}

/// A helper's state on its control connection (`nfct_help(ct)->help`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HelpState {
    Ftp(ftp::FtpState),
    Sip(sip::SipState),
}
