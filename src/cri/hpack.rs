//! HPACK (RFC 7541), as much as a relay needs: a strict decoder that keeps a peer's dynamic
//! table in step, and an encoder that writes header fields as literals without indexing, so
//! what nix-cri sends never depends on, or changes, any table.
//!
//! The h2 crate keeps its HPACK codec private, and the published HPACK crates either build a
//! Huffman lookup map per string or copy the input per field; on a path every kubelet call
//! takes, that costs more than the rest of the relay. This codec decodes the canonical Huffman
//! code from its code lengths alone (Appendix B), with no tables to keep in agreement.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HpackError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("integer overflows")]
    IntegerOverflow,
    #[error("index {0} is not in the static or dynamic table")]
    BadIndex(usize),
    #[error("invalid Huffman code")]
    BadHuffman,
    #[error("dynamic table size update to {size} exceeds the limit of {limit}")]
    TableSizeTooLarge { size: usize, limit: usize },
    #[error("dynamic table size update after a header field")]
    LateSizeUpdate,
    #[error("header list larger than {0} bytes")]
    TooLarge(usize),
}

/// One header field as decoded: name and value, and whether the sender asked that it never
/// be indexed (a sensitive value, RFC 7541 §7.1.3), which a relay must keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: Bytes,
    pub value: Bytes,
    pub never_indexed: bool,
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// An entry's size in the dynamic table (RFC 7541 §4.1).
fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + 32
}

/// The decoding side of one direction of a connection.
pub struct Decoder {
    /// Newest first, as HPACK indexes it.
    table: VecDeque<(Bytes, Bytes)>,
    size: usize,
    /// The table's current maximum, set by the encoder's size updates.
    max_size: usize,
    /// The most the encoder may set it to: the decoder side's SETTINGS_HEADER_TABLE_SIZE.
    limit: usize,
    /// The most a block may decode to (names, values and 32 bytes each).
    max_list: usize,
}

impl Decoder {
    pub fn new(max_list: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: 4096,
            limit: 4096,
            max_list,
        }
    }

    /// The limit the decoding peer advertised (SETTINGS_HEADER_TABLE_SIZE). A relay sees the
    /// setting pass before the encoder acts on it, so the larger of old and new is allowed.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = self.limit.max(limit);
    }

    /// Decodes one whole header block (HEADERS and its CONTINUATIONs, joined).
    pub fn decode(&mut self, block: &Bytes) -> Result<Vec<Field>, HpackError> {
        let mut fields = Vec::with_capacity(12);
        let mut at = 0;
        let mut list_size = 0;
        while at < block.len() {
            let first = block[at];
            if first & 0x80 != 0 {
                let (index, used) = integer(&block[at..], 7)?;
                at += used;
                let (name, value) = self.get(index)?;
                fields.push(Field {
                    name,
                    value,
                    never_indexed: false,
                });
            } else if first & 0xe0 == 0x20 {
                if !fields.is_empty() {
                    return Err(HpackError::LateSizeUpdate);
                }
                let (size, used) = integer(&block[at..], 5)?;
                at += used;
                if size > self.limit {
                    return Err(HpackError::TableSizeTooLarge {
                        size,
                        limit: self.limit,
                    });
                }
                self.max_size = size;
                self.evict(0);
                continue;
            } else {
                let (prefix, indexing, never_indexed) = if first & 0xc0 == 0x40 {
                    (6, true, false)
                } else {
                    (4, false, first & 0xf0 == 0x10)
                };
                let (index, used) = integer(&block[at..], prefix)?;
                at += used;
                let name = if index == 0 {
                    let (name, used) = string(block, at)?;
                    at += used;
                    name
                } else {
                    self.get(index)?.0
                };
                let (value, used) = string(block, at)?;
                at += used;
                if indexing {
                    self.insert(name.clone(), value.clone());
                }
                fields.push(Field {
                    name,
                    value,
                    never_indexed,
                });
            }
            let last = &fields[fields.len() - 1];
            list_size += entry_size(&last.name, &last.value);
            if list_size > self.max_list {
                return Err(HpackError::TooLarge(self.max_list));
            }
        }
        Ok(fields)
    }

    fn get(&self, index: usize) -> Result<(Bytes, Bytes), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let (name, value) = STATIC_TABLE[index - 1];
                Ok((
                    Bytes::from_static(name.as_bytes()),
                    Bytes::from_static(value.as_bytes()),
                ))
            }
            _ => self
                .table
                .get(index - 62)
                .cloned()
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    fn insert(&mut self, name: Bytes, value: Bytes) {
        let size = entry_size(&name, &value);
        if size > self.max_size {
            // An entry larger than the table empties it (RFC 7541 §4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.table.pop_back() {
                Some((name, value)) => self.size -= entry_size(&name, &value),
                None => break,
            }
        }
    }
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), and the bytes it took.
fn integer(input: &[u8], prefix: u8) -> Result<(usize, usize), HpackError> {
    let max_prefix = (1usize << prefix) - 1;
    let first = *input.first().ok_or(HpackError::Truncated)? as usize & max_prefix;
    if first < max_prefix {
        return Ok((first, 1));
    }
    let mut value = max_prefix;
    let mut shift = 0u32;
    for (i, &byte) in input.iter().enumerate().skip(1) {
        // Four continuation bytes carry 28 bits: more than any table index or string length
        // a header block can need.
        if shift > 21 {
            return Err(HpackError::IntegerOverflow);
        }
        value += ((byte & 0x7f) as usize) << shift;
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
        shift += 7;
    }
    Err(HpackError::Truncated)
}

/// A string literal at `block[at..]` (RFC 7541 §5.2), and the bytes it took. Plain strings
/// share the block's memory.
fn string(block: &Bytes, at: usize) -> Result<(Bytes, usize), HpackError> {
    let input = &block[at..];
    let huffman = input.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let (len, used) = integer(input, 7)?;
    let end = used.checked_add(len).ok_or(HpackError::Truncated)?;
    if end > input.len() {
        return Err(HpackError::Truncated);
    }
    let value = if huffman {
        Bytes::from(huffman_decode(&input[used..end])?)
    } else {
        block.slice(at + used..at + end)
    };
    Ok((value, end))
}

/// Code lengths of the HPACK Huffman code (RFC 7541 Appendix B), symbols 0–255 then EOS. The
/// code is canonical: codes of one length are consecutive, in symbol order, and each length
/// starts where the one before ended, shifted left. So the lengths define every code.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, //
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, //
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, //
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, //
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, //
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, //
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, //
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, //
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, //
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, //
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, //
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, //
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, //
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, //
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, //
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, //
    30,
];

const EOS: u16 = 256;
const MAX_CODE_LENGTH: usize = 30;

/// The canonical code in decoding form: per length, the first code and where its symbols
/// start in `symbols`, which lists the symbols by (length, symbol).
struct Canonical {
    first_code: [u32; MAX_CODE_LENGTH + 1],
    count: [u32; MAX_CODE_LENGTH + 1],
    offset: [u32; MAX_CODE_LENGTH + 1],
    symbols: [u16; 257],
}

const CANONICAL: Canonical = canonical();

const fn canonical() -> Canonical {
    let mut count = [0u32; MAX_CODE_LENGTH + 1];
    let mut s = 0;
    while s < 257 {
        count[CODE_LENGTHS[s] as usize] += 1;
        s += 1;
    }
    let mut first_code = [0u32; MAX_CODE_LENGTH + 1];
    let mut offset = [0u32; MAX_CODE_LENGTH + 1];
    let mut code = 0u32;
    let mut index = 0u32;
    let mut len = 1;
    while len <= MAX_CODE_LENGTH {
        code = (code + count[len - 1]) << 1;
        first_code[len] = code;
        offset[len] = index;
        index += count[len];
        len += 1;
    }
    let mut symbols = [0u16; 257];
    let mut next = offset;
    let mut s = 0;
    while s < 257 {
        let len = CODE_LENGTHS[s] as usize;
        symbols[next[len] as usize] = s as u16;
        next[len] += 1;
        s += 1;
    }
    Canonical {
        first_code,
        count,
        offset,
        symbols,
    }
}

/// Decodes a Huffman-coded string. The padding must be fewer than eight bits, all ones (a
/// prefix of EOS), and EOS itself must not appear (RFC 7541 §5.2).
pub fn huffman_decode(input: &[u8]) -> Result<Vec<u8>, HpackError> {
    let c = &CANONICAL;
    let mut out = Vec::with_capacity(input.len() * 8 / 5);
    let mut code = 0u32;
    let mut len = 0usize;
    for &byte in input {
        for bit in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            let rank = code.wrapping_sub(c.first_code[len]);
            if rank < c.count[len] {
                let symbol = c.symbols[(c.offset[len] + rank) as usize];
                if symbol == EOS {
                    return Err(HpackError::BadHuffman);
                }
                out.push(symbol as u8);
                code = 0;
                len = 0;
            } else if len == MAX_CODE_LENGTH {
                return Err(HpackError::BadHuffman);
            }
        }
    }
    // What is left is padding: under a byte, and all ones.
    if len >= 8 || code != (1 << len) - 1 {
        return Err(HpackError::BadHuffman);
    }
    Ok(out)
}

/// Appends `name: value` as a literal field without indexing (RFC 7541 §6.2.2), or never
/// indexed if the sender asked so, naming it by static-table index where one fits. Strings are
/// written plain: on a unix socket, bytes are cheaper than Huffman coding them.
pub fn encode_field(out: &mut BytesMut, name: &[u8], value: &[u8], never_indexed: bool) {
    if !never_indexed && let Some(index) = static_field_index(name, value) {
        put_integer(out, 0x80, 7, index);
        return;
    }
    let flag = if never_indexed { 0x10 } else { 0x00 };
    match static_name_index(name) {
        Some(index) => put_integer(out, flag, 4, index),
        None => {
            out.put_u8(flag);
            put_string(out, name);
        }
    }
    put_string(out, value);
}

/// The static-table index of a whole field, for the fields gRPC sends that have one.
fn static_field_index(name: &[u8], value: &[u8]) -> Option<usize> {
    Some(match (name, value) {
        (b":method", b"GET") => 2,
        (b":method", b"POST") => 3,
        (b":scheme", b"http") => 6,
        (b":scheme", b"https") => 7,
        (b":status", b"200") => 8,
        _ => return None,
    })
}

/// The static-table index of a name (its first entry), found by a `match` the compiler
/// turns into length and byte comparisons rather than a scan of the table.
fn static_name_index(name: &[u8]) -> Option<usize> {
    Some(match name {
        b":authority" => 1,
        b":method" => 2,
        b":path" => 4,
        b":scheme" => 6,
        b":status" => 8,
        b"accept-charset" => 15,
        b"accept-encoding" => 16,
        b"accept-language" => 17,
        b"accept-ranges" => 18,
        b"accept" => 19,
        b"access-control-allow-origin" => 20,
        b"age" => 21,
        b"allow" => 22,
        b"authorization" => 23,
        b"cache-control" => 24,
        b"content-disposition" => 25,
        b"content-encoding" => 26,
        b"content-language" => 27,
        b"content-length" => 28,
        b"content-location" => 29,
        b"content-range" => 30,
        b"content-type" => 31,
        b"cookie" => 32,
        b"date" => 33,
        b"etag" => 34,
        b"expect" => 35,
        b"expires" => 36,
        b"from" => 37,
        b"host" => 38,
        b"if-match" => 39,
        b"if-modified-since" => 40,
        b"if-none-match" => 41,
        b"if-range" => 42,
        b"if-unmodified-since" => 43,
        b"last-modified" => 44,
        b"link" => 45,
        b"location" => 46,
        b"max-forwards" => 47,
        b"proxy-authenticate" => 48,
        b"proxy-authorization" => 49,
        b"range" => 50,
        b"referer" => 51,
        b"refresh" => 52,
        b"retry-after" => 53,
        b"server" => 54,
        b"set-cookie" => 55,
        b"strict-transport-security" => 56,
        b"transfer-encoding" => 57,
        b"user-agent" => 58,
        b"vary" => 59,
        b"via" => 60,
        b"www-authenticate" => 61,
        _ => return None,
    })
}

fn put_string(out: &mut BytesMut, s: &[u8]) {
    put_integer(out, 0x00, 7, s.len());
    out.put_slice(s);
}

fn put_integer(out: &mut BytesMut, flags: u8, prefix: u8, mut value: usize) {
    let max_prefix = (1usize << prefix) - 1;
    if value < max_prefix {
        out.put_u8(flags | value as u8);
        return;
    }
    out.put_u8(flags | max_prefix as u8);
    value -= max_prefix;
    while value >= 0x80 {
        out.put_u8((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

/// Entry point for the fuzzer: the input as HTTP/2 frames, whose header block fragments are
/// decoded by one decoder in turn, as the relay does. Nothing may panic, a decoded block
/// re-encoded by [`encode_field`] must decode to the same fields, and the dynamic table must
/// stay within its size.
pub fn fuzz_logic(data: &[u8]) {
    let mut frames = BytesMut::from(data);
    let mut decoder = Decoder::new(1 << 16);
    while let Ok(Some(frame)) = super::frame::parse(&mut frames, super::frame::DEFAULT_MAX_FRAME) {
        let _ = (
            frame.data(),
            frame.window_increment(),
            frame.settings(),
            frame.goaway_last_stream(),
        );
        let Ok(fragment) = frame.fragment() else {
            continue;
        };
        let Ok(fields) = decoder.decode(&fragment) else {
            continue;
        };
        assert!(decoder.size <= decoder.max_size);
        let mut block = BytesMut::new();
        for f in &fields {
            encode_field(&mut block, &f.name, &f.value, f.never_indexed);
        }
        let again = Decoder::new(usize::MAX)
            .decode(&block.freeze())
            .expect("an encoded block decodes");
        assert_eq!(again, fields);
    }
    let _ = huffman_decode(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Bytes {
        let s: String = s.split_whitespace().collect();
        Bytes::from(data_encoding::HEXLOWER.decode(s.as_bytes()).unwrap())
    }

    fn pairs(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8(f.name.to_vec()).unwrap(),
                    String::from_utf8(f.value.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn the_code_is_complete_and_matches_the_rfc_where_it_shows_codes() {
        // A complete prefix code: the Kraft sum is exactly one.
        let kraft: u64 = CODE_LENGTHS.iter().map(|&l| 1u64 << (30 - l)).sum();
        assert_eq!(kraft, 1 << 30);
        let code_of = |symbol: u16| {
            let c = &CANONICAL;
            let len = CODE_LENGTHS[symbol as usize] as usize;
            let rank = (c.offset[len]..c.offset[len] + c.count[len])
                .position(|i| c.symbols[i as usize] == symbol)
                .unwrap() as u32;
            (c.first_code[len] + rank, len)
        };
        // Spot checks against Appendix B.
        assert_eq!(code_of(b'0' as u16), (0x0, 5));
        assert_eq!(code_of(b' ' as u16), (0x14, 6));
        assert_eq!(code_of(b'a' as u16), (0x3, 5));
        assert_eq!(code_of(b'&' as u16), (0xf8, 8));
        assert_eq!(code_of(0), (0x1ff8, 13));
        assert_eq!(code_of(255), (0x3ffffee, 26));
        assert_eq!(code_of(EOS), (0x3fffffff, 30));
    }

    #[test]
    fn rfc_c4_requests_with_huffman_share_one_table() {
        // RFC 7541 C.4.1–C.4.3: three requests on one connection.
        let mut d = Decoder::new(1 << 20);
        let first = d
            .decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"))
            .unwrap();
        assert_eq!(
            pairs(&first),
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        let second = d.decode(&hex("8286 84be 5886 a8eb 1064 9cbf")).unwrap();
        assert_eq!(
            pairs(&second)[4],
            ("cache-control".into(), "no-cache".into())
        );
        assert_eq!(
            pairs(&second)[3],
            (":authority".into(), "www.example.com".into())
        );
        let third = d
            .decode(&hex(
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ))
            .unwrap();
        assert_eq!(pairs(&third)[2], (":path".into(), "/index.html".into()));
        assert_eq!(
            pairs(&third)[4],
            ("custom-key".into(), "custom-value".into())
        );
        assert_eq!(d.size, 164);
    }

    #[test]
    fn rfc_c5_eviction_keeps_the_table_within_its_size() {
        // RFC 7541 C.5.1–C.5.2: responses with a 256-byte table; the second evicts.
        let mut d = Decoder::new(1 << 20);
        d.limit = 256;
        d.max_size = 256;
        d.decode(&hex(
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
             2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
             6c65 2e63 6f6d",
        ))
        .unwrap();
        assert_eq!(d.size, 222);
        let second = d.decode(&hex("4803 3330 37c1 c0bf")).unwrap();
        assert_eq!(pairs(&second)[0], (":status".into(), "307".into()));
        assert_eq!(pairs(&second)[3].0, "location");
        assert_eq!(d.size, 222);
        assert_eq!(d.table.len(), 4);
    }

    #[test]
    fn bad_input_is_refused() {
        let mut d = Decoder::new(1 << 20);
        assert_eq!(d.decode(&hex("80")), Err(HpackError::BadIndex(0)));
        assert_eq!(d.decode(&hex("be")), Err(HpackError::BadIndex(62)));
        assert_eq!(d.decode(&hex("4188")), Err(HpackError::Truncated));
        assert_eq!(d.decode(&hex("3fe1 1f")), Ok(vec![]));
        assert_eq!(
            d.decode(&hex("3fe2 1f")),
            Err(HpackError::TableSizeTooLarge {
                size: 4097,
                limit: 4096
            })
        );
        assert_eq!(d.decode(&hex("82 20")), Err(HpackError::LateSizeUpdate));
        assert_eq!(
            d.decode(&hex("ff ff ff ff ff 0f")),
            Err(HpackError::IntegerOverflow)
        );
        // EOS inside a string, and padding that is not all ones.
        assert_eq!(
            huffman_decode(&hex("ffff fffc")),
            Err(HpackError::BadHuffman)
        );
        assert_eq!(huffman_decode(&hex("00")), Err(HpackError::BadHuffman));
        // Padding of a whole byte.
        assert_eq!(huffman_decode(&hex("1f ff")), Err(HpackError::BadHuffman));
        let mut small = Decoder::new(50);
        assert_eq!(
            small.decode(&hex("4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf")),
            Err(HpackError::TooLarge(50))
        );
    }

    proptest::proptest! {
        #[test]
        fn fuzz_logic_never_panics(data: Vec<u8>) {
            fuzz_logic(&data);
        }
    }

    #[test]
    fn the_static_lookups_agree_with_the_table() {
        for (i, (name, value)) in STATIC_TABLE.iter().enumerate() {
            let first = STATIC_TABLE.iter().position(|(n, _)| n == name).unwrap() + 1;
            assert_eq!(static_name_index(name.as_bytes()), Some(first), "{name}");
            if let Some(index) = static_field_index(name.as_bytes(), value.as_bytes()) {
                assert_eq!(index, i + 1, "{name}: {value}");
            }
        }
        assert_eq!(static_field_index(b":method", b"POST"), Some(3));
        assert_eq!(static_name_index(b"grpc-timeout"), None);
    }

    #[test]
    fn encoded_fields_decode_to_themselves_and_leave_the_table_alone() {
        let long = "x".repeat(300);
        let fields = [
            (":method", "POST", false),
            (":path", "/runtime.v1.RuntimeService/Version", false),
            ("content-type", "application/grpc", false),
            ("grpc-timeout", "1999963u", false),
            ("authorization", "secret", true),
            ("x-long", long.as_str(), false),
        ];
        let mut block = BytesMut::new();
        for (n, v, never) in fields {
            encode_field(&mut block, n.as_bytes(), v.as_bytes(), never);
        }
        let mut d = Decoder::new(1 << 20);
        let decoded = d.decode(&block.freeze()).unwrap();
        assert_eq!(decoded.len(), fields.len());
        for (field, (n, v, never)) in decoded.iter().zip(fields) {
            assert_eq!(
                (&field.name[..], &field.value[..]),
                (n.as_bytes(), v.as_bytes())
            );
            assert_eq!(field.never_indexed, never);
        }
        assert!(d.table.is_empty());
    }
}
