//! Protobuf at the wire level, and gRPC message framing.
//!
//! nix-cri never re-encodes a CRI message it forwards: decoding into k8s-cri's types would
//! drop every field newer than those bindings. Where it must change a message it edits the
//! encoded bytes: drop top-level fields by number, append fields, or edit an embedded message
//! in place. Appending is enough for most edits, because protobuf parsers merge repeated
//! occurrences of an embedded message field and let the last occurrence of a scalar field win.
//!
//! ```text
//! message = { field }
//! field   = key:varint (number << 3 | wire type) value
//! value   = varint | fixed64 (8 bytes) | length-delimited (varint length, bytes) | fixed32
//! ```
//! Groups (wire types 3 and 4) are deprecated and never used by the CRI; they are refused.

use bytes::{BufMut, Bytes, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("malformed protobuf: {0}")]
    Malformed(&'static str),
    #[error("malformed gRPC frame: {0}")]
    Frame(&'static str),
    #[error("compressed gRPC messages are not supported on intercepted calls")]
    Compressed,
}

pub const WIRE_VARINT: u8 = 0;
pub const WIRE_FIXED64: u8 = 1;
pub const WIRE_LEN: u8 = 2;
pub const WIRE_FIXED32: u8 = 5;

/// One top-level field of an encoded message: where it is and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    pub number: u32,
    pub wire_type: u8,
    /// The whole field, key included, as it appeared.
    pub raw: &'a [u8],
    /// The value: the varint's bytes, the fixed bytes, or a length-delimited payload.
    pub value: &'a [u8],
}

fn read_varint(bytes: &[u8], pos: &mut usize) -> Result<u64, WireError> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *bytes
            .get(*pos)
            .ok_or(WireError::Malformed("truncated varint"))?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireError::Malformed("varint longer than 10 bytes"))
}

pub fn put_varint(out: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

/// Iterates the top-level fields of `message`, refusing anything malformed.
pub fn fields(message: &[u8]) -> impl Iterator<Item = Result<Field<'_>, WireError>> {
    let mut pos = 0;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || pos >= message.len() {
            return None;
        }
        let result = next_field(message, &mut pos);
        failed = result.is_err();
        Some(result)
    })
}

fn next_field<'a>(message: &'a [u8], pos: &mut usize) -> Result<Field<'a>, WireError> {
    let start = *pos;
    let key = read_varint(message, pos)?;
    let number =
        u32::try_from(key >> 3).map_err(|_| WireError::Malformed("field number too large"))?;
    if number == 0 {
        return Err(WireError::Malformed("field number 0"));
    }
    let wire_type = (key & 7) as u8;
    let value_start;
    match wire_type {
        WIRE_VARINT => {
            value_start = *pos;
            read_varint(message, pos)?;
        }
        WIRE_FIXED64 | WIRE_FIXED32 => {
            let width = if wire_type == WIRE_FIXED64 { 8 } else { 4 };
            value_start = *pos;
            *pos = pos
                .checked_add(width)
                .filter(|end| *end <= message.len())
                .ok_or(WireError::Malformed("truncated fixed-width value"))?;
        }
        WIRE_LEN => {
            let len = read_varint(message, pos)?;
            value_start = *pos;
            *pos = usize::try_from(len)
                .ok()
                .and_then(|len| pos.checked_add(len))
                .filter(|end| *end <= message.len())
                .ok_or(WireError::Malformed(
                    "length-delimited value runs past the end",
                ))?;
        }
        _ => return Err(WireError::Malformed("unsupported wire type")),
    }
    Ok(Field {
        number,
        wire_type,
        raw: &message[start..*pos],
        value: &message[value_start..*pos],
    })
}

/// Checks that `message` parses as a sequence of fields.
pub fn validate(message: &[u8]) -> Result<(), WireError> {
    fields(message).try_for_each(|f| f.map(|_| ()))
}

/// Appends a length-delimited field (string, bytes or embedded message).
pub fn put_len_field(out: &mut BytesMut, number: u32, value: &[u8]) {
    put_varint(out, (u64::from(number) << 3) | u64::from(WIRE_LEN));
    put_varint(out, value.len() as u64);
    out.put_slice(value);
}

/// Appends a varint field (bool, enum, integer).
pub fn put_varint_field(out: &mut BytesMut, number: u32, value: u64) {
    put_varint(out, (u64::from(number) << 3) | u64::from(WIRE_VARINT));
    put_varint(out, value);
}

/// An encoded `map<string, string>` entry (key = 1, value = 2).
pub fn map_entry(key: &str, value: &str) -> BytesMut {
    let mut entry = BytesMut::new();
    put_len_field(&mut entry, 1, key.as_bytes());
    put_len_field(&mut entry, 2, value.as_bytes());
    entry
}

/// Rewrites `message`: each top-level field is kept, dropped or replaced by `edit`, in
/// order, and `append` is added at the end. Unknown fields pass through untouched.
pub fn rewrite(
    message: &[u8],
    mut edit: impl FnMut(&Field<'_>) -> Result<Edit, WireError>,
    append: &[u8],
) -> Result<Bytes, WireError> {
    let mut out = BytesMut::with_capacity(message.len() + append.len());
    for field in fields(message) {
        let field = field?;
        match edit(&field)? {
            Edit::Keep => out.put_slice(field.raw),
            Edit::Drop => {}
            Edit::Replace(bytes) => out.put_slice(&bytes),
        }
    }
    out.put_slice(append);
    Ok(out.freeze())
}

/// What `rewrite` does with one field.
#[derive(Debug)]
pub enum Edit {
    Keep,
    Drop,
    /// Replace the whole field (key included) with these bytes.
    Replace(Bytes),
}

/// Re-encodes a length-delimited field with a new payload.
pub fn len_field(number: u32, value: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(value.len() + 6);
    put_len_field(&mut out, number, value);
    out.freeze()
}

/// gRPC's length-prefixed message: compressed flag (1 byte), length (4 bytes, big endian),
/// message. Returns the single message of a unary call.
pub fn unframe(body: &[u8]) -> Result<&[u8], WireError> {
    let (header, rest) = body
        .split_at_checked(5)
        .ok_or(WireError::Frame("shorter than its 5-byte header"))?;
    if header[0] != 0 {
        return Err(WireError::Compressed);
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if rest.len() != len {
        return Err(WireError::Frame(
            "length does not match the body (one message expected)",
        ));
    }
    Ok(rest)
}

pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(message.len() + 5);
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// Entry point for the fuzzer: whatever the input, parsing and rewriting must not panic, and
/// a message rewritten with every field kept must come back byte for byte.
pub fn fuzz_logic(data: &[u8]) {
    if validate(data).is_ok() {
        let same = rewrite(data, |_| Ok(Edit::Keep), &[]);
        assert_eq!(same.as_deref().ok(), Some(data));
    }
    let _ = unframe(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn unknown_fields_survive_a_rewrite() {
        // A CreateContainerRequest with a field number far beyond what CRI defines today.
        let mut message = BytesMut::new();
        put_len_field(&mut message, 1, b"sandbox-id");
        put_len_field(&mut message, 999, b"from a newer kubelet");
        put_varint_field(&mut message, 1000, 42);
        let rewritten = rewrite(&message, |_| Ok(Edit::Keep), &[]).unwrap();
        assert_eq!(rewritten, message.freeze());
    }

    #[test]
    fn appended_embedded_messages_merge_and_scalars_are_replaced() {
        use k8s_cri::v1::{ContainerConfig, CreateContainerRequest, Mount, RunPodSandboxRequest};
        let request = CreateContainerRequest {
            pod_sandbox_id: "p".into(),
            config: Some(ContainerConfig {
                mounts: vec![Mount {
                    container_path: "/data".into(),
                    ..Mount::default()
                }],
                ..ContainerConfig::default()
            }),
            sandbox_config: None,
        };
        let encoded = request.encode_to_vec();
        let mut extra_config = BytesMut::new();
        let mount = Mount {
            container_path: "/nix/store/x".into(),
            host_path: "/var/lib/nix-cri/nix/store/x".into(),
            readonly: true,
            ..Mount::default()
        };
        put_len_field(&mut extra_config, 7, &mount.encode_to_vec());
        let patched = rewrite(&encoded, |_| Ok(Edit::Keep), &len_field(2, &extra_config)).unwrap();
        let decoded = CreateContainerRequest::decode(patched).unwrap();
        let mounts = decoded.config.unwrap().mounts;
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[1], mount);
        assert_eq!(decoded.pod_sandbox_id, "p");

        let run = RunPodSandboxRequest {
            config: None,
            runtime_handler: "nix".into(),
        };
        let patched = rewrite(
            &run.encode_to_vec(),
            |f| {
                Ok(if f.number == 2 {
                    Edit::Drop
                } else {
                    Edit::Keep
                })
            },
            &len_field(2, b"runc"),
        )
        .unwrap();
        assert_eq!(
            RunPodSandboxRequest::decode(patched)
                .unwrap()
                .runtime_handler,
            "runc"
        );
    }

    #[test]
    fn malformed_input_is_refused_not_misread() {
        for bad in [
            &[0x0a, 0x05, b'a'][..], // length past the end
            &[0x08],                 // varint missing
            &[0x00, 0x01],           // field number 0
            &[0x0b],                 // group start
            &[0x09, 1, 2, 3],        // truncated fixed64
            &[
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ], // 11-byte varint
        ] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn frames_round_trip_and_bad_frames_are_named() {
        let framed = frame(b"hello");
        assert_eq!(unframe(&framed).unwrap(), b"hello");
        assert_eq!(
            unframe(&framed[..4]),
            Err(WireError::Frame("shorter than its 5-byte header"))
        );
        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        assert_eq!(unframe(&compressed), Err(WireError::Compressed));
        let mut two = framed.to_vec();
        two.extend_from_slice(&framed);
        assert!(unframe(&two).is_err());
    }

    proptest::proptest! {
        #[test]
        fn fuzz_logic_never_panics(data: Vec<u8>) {
            fuzz_logic(&data);
        }
    }
}
