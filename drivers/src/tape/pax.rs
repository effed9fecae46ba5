//! pax extended headers: the records `LEN key=value\n`, where LEN (decimal) counts the whole
//! record including its own digits, and the keys this format reads.

use super::TapeError;

/// The key of the padding record of the pax header.
const COMMENT_KEY: &str = "comment";
/// The text the padding record's value starts with (when there is room for it).
const COMMENT_TEXT: &str =
    "quicksplit: padding so that volume.img starts on a tape record boundary";

/// The number of decimal digits of `n`.
fn decimal_digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// A pax record `LEN key=value\n`, LEN counting the whole record including its own digits.
pub(crate) fn pax_record(key: &str, value: &str) -> String {
    // Everything but the length digits: the space, the '=', the newline, key and value.
    let rest = key.len() + value.len() + 3;
    // Adding the digits may add a digit (e.g. rest 98: 98 + 2 = 100 has 3 digits): iterate to
    // the fixed point, which is reached in at most two more steps.
    let mut len = rest + decimal_digits(rest);
    while rest + decimal_digits(len) != len {
        len = rest + decimal_digits(len);
    }
    format!("{len} {key}={value}\n")
}

/// A pax `comment=` record of exactly `total` bytes (at least 12: `12 comment=\n`), or `None`
/// if `total` is too small.
pub(crate) fn pax_comment_of_len(total: usize) -> Option<String> {
    // total = digits(total) + 1 (space) + key + 1 ('=') + value + 1 (newline).
    let value_len = total.checked_sub(decimal_digits(total) + COMMENT_KEY.len() + 3)?;
    let mut value = String::with_capacity(value_len);
    if value_len >= COMMENT_TEXT.len() {
        value.push_str(COMMENT_TEXT);
    }
    while value.len() < value_len {
        value.push(' ');
    }
    let record = format!("{total} {COMMENT_KEY}={value}\n");
    (record.len() == total).then_some(record)
}

/// The shortest possible comment record: `12 comment=\n`.
pub(crate) const MIN_COMMENT: usize = 12;

/// What a pax extended header says about the next member (the keys this format uses).
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct PaxOverrides {
    /// The `size=` record.
    pub size: Option<u64>,
    /// The `path=` record.
    pub path: Option<String>,
    /// `GNU.sparse.major=` and `GNU.sparse.minor=`: the member is a sparse file of that format.
    pub sparse_version: (Option<u64>, Option<u64>),
    /// `GNU.sparse.name=`: the sparse file's real name.
    pub sparse_name: Option<String>,
    /// `GNU.sparse.realsize=`: the sparse file's real size.
    pub sparse_realsize: Option<u64>,
}

/// Parses the decimal value of a numeric record.
fn decimal(value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?;
    text.parse::<u64>()
        .ok()
        .filter(|_| text.bytes().all(|b| b.is_ascii_digit()))
}

/// Parses the data of a pax extended header whose header is at `offset`. Keys other than
/// `size`, `path` and the GNU.sparse 1.0 ones are ignored; later records override earlier ones.
pub(crate) fn parse_pax(
    data: &[u8],
    offset: u64,
    into: &mut PaxOverrides,
) -> Result<(), TapeError> {
    let mut rest = data;
    let mut at = 0usize;
    while !rest.is_empty() {
        let bad = |reason: String| TapeError::MalformedHeader {
            offset,
            reason: format!("pax record at byte {at} of the extended header: {reason}"),
        };
        let space = rest
            .iter()
            .take(20)
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("no length".into()))?;
        let len_text = &rest[..space];
        if len_text.is_empty() || !len_text.iter().all(u8::is_ascii_digit) {
            return Err(bad(format!("length {len_text:?} is not decimal")));
        }
        let len = len_text.iter().try_fold(0usize, |acc, &b| {
            acc.checked_mul(10)?.checked_add(usize::from(b - b'0'))
        });
        let len = match len {
            Some(len) if len > space + 1 && len <= rest.len() => len,
            _ => {
                return Err(bad(format!(
                    "length {} does not fit the {} bytes left",
                    String::from_utf8_lossy(len_text),
                    rest.len()
                )))
            }
        };
        let record = &rest[..len];
        if record[len - 1] != b'\n' {
            return Err(bad("does not end with a newline".into()));
        }
        let kv = &record[space + 1..len - 1];
        let eq = kv
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("no '='".into()))?;
        let (key, value) = (&kv[..eq], &kv[eq + 1..]);
        let number = || {
            decimal(value).ok_or_else(|| {
                bad(format!(
                    "{} {value:?} is not a decimal number",
                    String::from_utf8_lossy(key)
                ))
            })
        };
        let text = || {
            std::str::from_utf8(value)
                .map(str::to_string)
                .map_err(|_| bad(format!("{} is not UTF-8", String::from_utf8_lossy(key))))
        };
        match key {
            b"size" => into.size = Some(number()?),
            b"path" => into.path = Some(text()?),
            b"GNU.sparse.major" => into.sparse_version.0 = Some(number()?),
            b"GNU.sparse.minor" => into.sparse_version.1 = Some(number()?),
            b"GNU.sparse.name" => into.sparse_name = Some(text()?),
            b"GNU.sparse.realsize" => into.sparse_realsize = Some(number()?),
            _ => {}
        }
        rest = &rest[len..];
        at += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_are_exact_across_digit_boundaries() {
        let lens = (0..3000).chain(9_980..10_020).chain(99_980..100_020);
        for value_len in lens {
            let value = "v".repeat(value_len);
            let rec = pax_record("k", &value);
            let (len, _) = rec.split_once(' ').unwrap();
            assert_eq!(
                len.parse::<usize>().unwrap(),
                rec.len(),
                "value_len {value_len}"
            );
            assert!(rec.ends_with('\n'));
        }
        // 98 bytes without the digits: 2 digits would give 100, which has 3.
        let rec = pax_record("k", &"v".repeat(94));
        assert_eq!(rec.len(), 101);
        assert!(rec.starts_with("101 k="));
    }

    #[test]
    fn comment_of_any_length_from_12() {
        assert_eq!(pax_comment_of_len(11), None);
        assert_eq!(pax_comment_of_len(12).as_deref(), Some("12 comment=\n"));
        let totals = (12..5000).chain(99_990..100_010).chain(999_990..1_000_010);
        for total in totals {
            let rec = pax_comment_of_len(total).unwrap();
            assert_eq!(rec.len(), total);
            let mut o = PaxOverrides::default();
            parse_pax(rec.as_bytes(), 0, &mut o).unwrap();
        }
    }

    #[test]
    fn malformed_pax_records() {
        let cases: &[&[u8]] = &[
            b"x",
            b"5 a=b",
            b"7 a=b\n",
            b"7 a=b\nX",
            b"6 ab\n",
            b"-5 a=\n",
            b"1 \n",
            b"99999999999999999999999999 a=b\n",
            b"11 size=x1\n",
            b"12 size=-12\n",
            b"12 size=+12\n",
        ];
        for case in cases {
            let mut o = PaxOverrides::default();
            assert!(
                parse_pax(case, 0, &mut o).is_err(),
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
        let mut o = PaxOverrides::default();
        parse_pax(b"11 size=42\n7 a=\xff\xfe\n", 0, &mut o).unwrap();
        assert_eq!(o.size, Some(42));
        for case in [
            &b"22 GNU.sparse.major=x\n"[..],
            b"28 GNU.sparse.realsize=-100\n",
            b"21 GNU.sparse.name=\xff\n",
        ] {
            let mut o = PaxOverrides::default();
            let err = parse_pax(case, 0, &mut o).unwrap_err().to_string();
            assert!(err.contains("GNU.sparse"), "{err}");
        }
    }

    #[test]
    fn sparse_records() {
        let mut data = pax_record("GNU.sparse.major", "1");
        data += &pax_record("GNU.sparse.minor", "0");
        data += &pax_record("GNU.sparse.name", "volume.img");
        data += &pax_record("GNU.sparse.realsize", "10737418240");
        data += &pax_record("size", "3584");
        let mut o = PaxOverrides::default();
        parse_pax(data.as_bytes(), 0, &mut o).unwrap();
        assert_eq!(o.sparse_version, (Some(1), Some(0)));
        assert_eq!(o.sparse_name.as_deref(), Some("volume.img"));
        assert_eq!(o.sparse_realsize, Some(10 << 30));
        assert_eq!(o.size, Some(3584));
    }
}
