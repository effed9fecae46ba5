//! `NBD_CMD_BLOCK_STATUS`: one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk per selected metadata
//! context, the last one flagged done. Answered at once on the connection's reactor: each
//! context's lookup is bounded, and a client asks again from where an answer ends.

use drivers::nbd::proto::{self, chunk, cmd, err, Request};

use super::meta::Selected;

/// Why a block status request gets an error: the errno and a message for the client.
pub(super) type Refusal = (u32, String);

/// The reply chunks to `req`, or its error: `EINVAL` without a context selected, or with a
/// range `range_error` found bad (outside the export, not whole blocks, empty).
pub(super) fn reply(
    selected: &Selected,
    req: &Request,
    range_error: Option<u32>,
) -> Result<Vec<u8>, Refusal> {
    if selected.is_empty() {
        return Err((
            err::EINVAL,
            "no metadata context was negotiated (NBD_OPT_SET_META_CONTEXT)".into(),
        ));
    }
    if let Some(e) = range_error {
        return Err((
            e,
            format!(
                "block status of {} bytes at {}: outside the export or not whole blocks",
                req.length, req.offset
            ),
        ));
    }
    let one = req.flags & cmd::FLAG_REQ_ONE != 0;
    let mut out = Vec::new();
    let mut descriptors = Vec::new();
    for (i, (id, context)) in selected.iter().enumerate() {
        descriptors.clear();
        context
            .status(req.offset, req.length, &mut descriptors)
            .map_err(|e| (proto::errno_of(&e), e.to_string()))?;
        if one {
            descriptors.truncate(1);
        }
        let last = i + 1 == selected.len();
        let flags = if last { chunk::FLAG_DONE } else { 0 };
        proto::block_status_chunk(&mut out, flags, req.cookie, *id, &descriptors);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::MetaContext;
    use drivers::IoError;
    use std::sync::Arc;

    /// A context whose extents are `run` bytes each, alternating flags 0 and 3.
    struct Striped(u32);

    impl MetaContext for Striped {
        fn name(&self) -> &str {
            "x-test:striped"
        }
        fn status(&self, offset: u64, len: u32, out: &mut Vec<(u32, u32)>) -> Result<(), IoError> {
            let (run, end) = (u64::from(self.0), offset + u64::from(len));
            let mut at = offset;
            while at < end {
                let n = (run - at % run).min(end - at);
                let odd = !(at / run).is_multiple_of(2);
                out.push((n as u32, if odd { 3 } else { 0 }));
                at += n;
            }
            Ok(())
        }
    }

    /// A reply chunk: flags, context id, descriptors.
    type Chunk = (u16, u32, Vec<(u32, u32)>);

    fn request(flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind: cmd::BLOCK_STATUS,
            cookie: 42,
            offset,
            length,
        }
    }

    /// The chunks of a reply.
    fn chunks(mut b: &[u8]) -> Vec<Chunk> {
        let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(be32(b), proto::STRUCTURED_REPLY_MAGIC);
            let flags = u16::from_be_bytes([b[4], b[5]]);
            assert_eq!(u16::from_be_bytes([b[6], b[7]]), chunk::BLOCK_STATUS);
            assert_eq!(&b[8..16], &42u64.to_be_bytes());
            let len = be32(&b[16..]) as usize;
            let payload = &b[20..20 + len];
            let d = payload[4..]
                .chunks_exact(8)
                .map(|c| (be32(c), be32(&c[4..])))
                .collect();
            out.push((flags, be32(payload), d));
            b = &b[20 + len..];
        }
        out
    }

    #[test]
    fn one_chunk_per_context_the_last_one_done() {
        let selected: Selected = vec![(1, Arc::new(Striped(4096))), (4, Arc::new(Striped(8192)))];
        let got = chunks(&reply(&selected, &request(0, 4096, 12288), None).expect("reply"));
        assert_eq!(
            got,
            vec![
                (0, 1, vec![(4096, 3), (4096, 0), (4096, 3)]),
                (chunk::FLAG_DONE, 4, vec![(4096, 0), (8192, 3)]),
            ]
        );
        // REQ_ONE: one descriptor per context.
        let got = chunks(
            &reply(&selected, &request(cmd::FLAG_REQ_ONE, 4096, 12288), None).expect("reply"),
        );
        assert_eq!(got[0].2, vec![(4096, 3)]);
        assert_eq!(got[1].2, vec![(4096, 0)]);
    }

    #[test]
    fn no_context_or_a_bad_range_is_einval() {
        let none = reply(&Selected::new(), &request(0, 0, 4096), None);
        assert_eq!(none.map_err(|e| e.0), Err(err::EINVAL));
        let selected: Selected = vec![(1, Arc::new(Striped(4096)))];
        let bad = reply(&selected, &request(0, 0, 4096), Some(err::EINVAL));
        assert_eq!(bad.map_err(|e| e.0), Err(err::EINVAL));
    }
}
