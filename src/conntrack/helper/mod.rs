//! Connection tracking helpers: the protocol parsers that find, inside a control connection,
//! the connections it is about to open (FTP data, SIP media), as the kernel's
//! `nf_conntrack_ftp.c` and `nf_conntrack_sip.c` do.
//!
//! So far: the FTP and SIP parsers. XXX: the expectation table and the NAT
//! payload rewrite (with TCP sequence adjustment) come with the helpers issue.

pub mod ftp;
pub mod sip;
