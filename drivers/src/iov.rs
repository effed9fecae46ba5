//! Gathering queued byte pieces into an iovec array for one vectored socket write, the way the
//! NBD server and the NVMe/TCP target and initiator send what a poll turn queued.

use std::io::IoSlice;

/// Fills `iov` with `parts` in order, leaving out their first `skip` bytes (sent by an earlier,
/// partial write) and empty parts; returns how many slots it filled, stopping when `iov` is
/// full.
pub fn gather<'a>(
    parts: impl IntoIterator<Item = &'a [u8]>,
    mut skip: usize,
    iov: &mut [IoSlice<'a>],
) -> usize {
    let mut n = 0;
    for part in parts {
        if n == iov.len() {
            break;
        }
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        iov[n] = IoSlice::new(&part[skip..]);
        n += 1;
        skip = 0;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::gather;
    use std::io::IoSlice;

    #[test]
    fn skips_sent_bytes_and_empty_parts_and_stops_when_full() {
        let parts: [&[u8]; 5] = [b"abc", b"", b"defg", b"h", b"ij"];
        let mut iov = [IoSlice::new(&[]); 8];
        let n = gather(parts, 4, &mut iov);
        let got: Vec<&[u8]> = iov[..n].iter().map(|s| &**s).collect();
        assert_eq!(got, vec![&b"efg"[..], b"h", b"ij"]);

        let mut small = [IoSlice::new(&[]); 2];
        let n = gather(parts, 0, &mut small);
        let got: Vec<&[u8]> = small[..n].iter().map(|s| &**s).collect();
        assert_eq!(got, vec![&b"abc"[..], b"defg"]);

        assert_eq!(gather(parts, 10, &mut iov), 0);
    }
}
