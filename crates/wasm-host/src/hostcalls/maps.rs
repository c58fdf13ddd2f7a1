//! The Proxy-Wasm serialized map: u32 count, count × (u32 key_len, u32 value_len), then each
//! key and value followed by a NUL byte; all little-endian.

pub(crate) fn serialize_map<'a>(
    entries: impl ExactSizeIterator<Item = (&'a str, &'a [u8])> + Clone,
) -> Vec<u8> {
    let count = entries.len();
    let payload: usize = entries.clone().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(4 + count * 8 + payload);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    for (k, v) in entries.clone() {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in entries {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses a serialized map, lowercasing keys. `None` when the sizes do not fit the data.
pub(crate) fn deserialize_map(data: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let u32_at = |at: usize| -> Option<usize> {
        let b = data.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if data.is_empty() {
        return Some(Vec::new());
    }
    let count = u32_at(0)?;
    let header_end = count.checked_mul(8)?.checked_add(4)?;
    if header_end > data.len() {
        return None;
    }
    let mut pos = header_end;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let klen = u32_at(4 + i * 8)?;
        let vlen = u32_at(8 + i * 8)?;
        let key = data.get(pos..pos.checked_add(klen)?)?;
        pos = pos.checked_add(klen + 1)?;
        let value = data.get(pos..pos.checked_add(vlen)?)?;
        pos = pos.checked_add(vlen + 1)?;
        if pos > data.len() {
            return None;
        }
        out.push((
            String::from_utf8_lossy(key).to_ascii_lowercase(),
            value.to_vec(),
        ));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let pairs: Vec<(&str, &[u8])> = vec![(":path", b"/a"), ("x", b""), ("k", b"v\0w")];
        let data = serialize_map(pairs.iter().copied());
        let back = deserialize_map(&data).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[0], (":path".to_string(), b"/a".to_vec()));
        assert_eq!(back[1], ("x".to_string(), vec![]));
        assert_eq!(back[2], ("k".to_string(), b"v\0w".to_vec()));
    }

    #[test]
    fn rejects_truncated_and_huge_counts() {
        let pairs: Vec<(&str, &[u8])> = vec![("key", b"value")];
        let data = serialize_map(pairs.iter().copied());
        for cut in 1..data.len() {
            assert!(deserialize_map(&data[..cut]).is_none(), "cut at {cut}");
        }
        assert!(deserialize_map(&[0xff, 0xff, 0xff, 0xff]).is_none());
        let mut lying = data.clone();
        lying[8] = 0xff; // value length far beyond the data
        assert!(deserialize_map(&lying).is_none());
        assert_eq!(deserialize_map(&[]), Some(vec![]));
    }
}
