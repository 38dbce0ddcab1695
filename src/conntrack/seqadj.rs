//! TCP sequence adjustment (`nf_conntrack_seqadj.c`): when a NAT helper changes the length of
//! a segment's payload (FTP's announced address), every later sequence number of that
//! direction, and every acknowledgement (SACK blocks too) of the other, is shifted by the
//! bytes added so far.
//!
//! Owns only the arithmetic on the per-direction records; the packet bytes are changed by
//! [`crate::packet::rewrite`]. Must not know rules or the table.

use super::proto::Dir;

/// One direction's record (`struct nf_ct_seqadj`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqAdjDir {
    /// The sequence number of the last segment whose length changed.
    pub correction_pos: u32,
    /// The shift of sequence numbers up to and including `correction_pos`.
    pub offset_before: i32,
    /// The shift after it.
    pub offset_after: i32,
}

/// Both directions of a connection (the ct extension; `IPS_SEQ_ADJUST` says it exists).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqAdj {
    pub dirs: [SeqAdjDir; 2],
}

fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

/// What [`SeqAdj::adjust`] gives a segment: its new sequence and acknowledgement numbers,
/// and the shift for each SACK block edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adjusted {
    pub seq: u32,
    pub ack: u32,
}

impl SeqAdj {
    /// `nf_ct_seqadj_set`: the segment of direction `dir` starting at `seq` grew by `off`
    /// bytes (shrank, if negative).
    pub fn set(&mut self, dir: Dir, seq: u32, off: i32) {
        if off == 0 {
            return;
        }
        let d = &mut self.dirs[dir.index()];
        if d.offset_before == d.offset_after || before(d.correction_pos, seq) {
            d.correction_pos = seq;
            d.offset_before = d.offset_after;
            d.offset_after = d.offset_after.wrapping_add(off);
        }
    }

    /// `nf_ct_seq_offset`: the shift of sequence number `seq` of direction `dir`.
    pub fn offset(&self, dir: Dir, seq: u32) -> i32 {
        let d = &self.dirs[dir.index()];
        if after(seq, d.correction_pos) {
            d.offset_after
        } else {
            d.offset_before
        }
    }

    /// The shift to take off an acknowledgement (or SACK edge) `ack` sent in direction `dir`:
    /// it acknowledges the other direction's bytes (`nf_ct_seq_adjust`'s `other_way`).
    pub fn ack_offset(&self, dir: Dir, ack: u32) -> i32 {
        let o = &self.dirs[dir.other().index()];
        if after(ack.wrapping_sub(o.offset_before as u32), o.correction_pos) {
            o.offset_after
        } else {
            o.offset_before
        }
    }

    /// `nf_ct_seq_adjust`: a segment of direction `dir` as it must leave.
    pub fn adjust(&self, dir: Dir, seq: u32, ack: u32) -> Adjusted {
        Adjusted {
            seq: seq.wrapping_add(self.offset(dir, seq) as u32),
            ack: ack.wrapping_sub(self.ack_offset(dir, ack) as u32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_longer_port_command_shifts_what_follows() {
        let mut s = SeqAdj::default();
        // The client's PORT at seq 1000 grew by 4 bytes.
        s.set(Dir::Original, 1000, 4);
        // That segment itself keeps its number; later ones move.
        assert_eq!(s.adjust(Dir::Original, 1000, 0).seq, 1000);
        assert_eq!(s.adjust(Dir::Original, 1030, 0).seq, 1034);
        // The server acknowledges the grown stream: its acks come back down.
        assert_eq!(s.adjust(Dir::Reply, 7, 1034).ack, 1030);
        assert_eq!(s.adjust(Dir::Reply, 7, 1000).ack, 1000);
        // A second change accumulates.
        s.set(Dir::Original, 1100, -2);
        assert_eq!(s.adjust(Dir::Original, 1101, 0).seq, 1103);
        assert_eq!(s.adjust(Dir::Original, 1050, 0).seq, 1054);
        assert_eq!(s.offset(Dir::Original, 1200), 2);
    }

    #[test]
    fn retransmitting_an_old_segment_does_not_move_the_mark_back() {
        let mut s = SeqAdj::default();
        s.set(Dir::Original, 1000, 4);
        s.set(Dir::Original, 900, 4);
        assert_eq!(s.dirs[0].correction_pos, 1000);
        assert_eq!(s.dirs[0].offset_after, 4);
    }
}
