//! HTTP/2 frames (RFC 9113 §4, §6) as the relay reads and writes them: a nine-byte header and a
//! payload, kept as the bytes that arrived so a frame can be passed on unchanged.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADER_LEN: usize = 9;
/// The largest payload a frame's 24-bit length can carry.
pub const MAX_PAYLOAD: usize = (1 << 24) - 1;
/// SETTINGS_MAX_FRAME_SIZE and the connection window before any SETTINGS or WINDOW_UPDATE.
pub const DEFAULT_MAX_FRAME: usize = 16_384;
pub const DEFAULT_WINDOW: i64 = 65_535;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// Error codes (RFC 9113 §7).
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;

#[derive(Debug, thiserror::Error)]
#[error("{what} (HTTP/2 error code {code:#x})")]
pub struct FrameError {
    pub code: u32,
    pub what: String,
}

impl FrameError {
    pub fn protocol(what: impl Into<String>) -> Self {
        Self {
            code: PROTOCOL_ERROR,
            what: what.into(),
        }
    }
}

/// One frame: its header fields and the whole frame's bytes, header included.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub raw: Bytes,
}

impl Frame {
    pub fn payload(&self) -> &[u8] {
        &self.raw[HEADER_LEN..]
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// The payload that counts against flow control is the whole payload, padding included.
    pub fn flow_len(&self) -> usize {
        self.raw.len() - HEADER_LEN
    }

    /// A DATA frame's data, without padding.
    pub fn data(&self) -> Result<Bytes, FrameError> {
        let (start, end) = self.unpadded()?;
        Ok(self.raw.slice(HEADER_LEN + start..HEADER_LEN + end))
    }

    /// A HEADERS, PUSH_PROMISE or CONTINUATION frame's header block fragment.
    pub fn fragment(&self) -> Result<Bytes, FrameError> {
        let (mut start, end) = self.unpadded()?;
        match self.kind {
            HEADERS if self.has(PRIORITY_FLAG) => start += 5,
            PUSH_PROMISE => start += 4,
            _ => {}
        }
        if start > end {
            return Err(FrameError {
                code: FRAME_SIZE_ERROR,
                what: format!("frame type {} too short for its fields", self.kind),
            });
        }
        Ok(self.raw.slice(HEADER_LEN + start..HEADER_LEN + end))
    }

    /// Where the payload's content lies once any padding is taken off.
    fn unpadded(&self) -> Result<(usize, usize), FrameError> {
        let payload = self.payload();
        let padded = matches!(self.kind, DATA | HEADERS | PUSH_PROMISE) && self.has(PADDED);
        if !padded {
            return Ok((0, payload.len()));
        }
        let pad = *payload
            .first()
            .ok_or_else(|| FrameError::protocol("padded frame without a pad length"))?
            as usize;
        if pad + 1 > payload.len() {
            return Err(FrameError::protocol("padding longer than the frame"));
        }
        Ok((1, payload.len() - pad))
    }

    /// A WINDOW_UPDATE's increment.
    pub fn window_increment(&self) -> Result<u32, FrameError> {
        let payload = self.payload();
        if payload.len() != 4 {
            return Err(FrameError {
                code: FRAME_SIZE_ERROR,
                what: "WINDOW_UPDATE of the wrong size".into(),
            });
        }
        Ok((&payload[..]).get_u32() & 0x7fff_ffff)
    }

    /// A SETTINGS frame's (identifier, value) pairs.
    pub fn settings(&self) -> Result<Vec<(u16, u32)>, FrameError> {
        let mut payload = self.payload();
        if !payload.len().is_multiple_of(6) {
            return Err(FrameError {
                code: FRAME_SIZE_ERROR,
                what: "SETTINGS of the wrong size".into(),
            });
        }
        let mut settings = Vec::with_capacity(payload.len() / 6);
        while payload.has_remaining() {
            settings.push((payload.get_u16(), payload.get_u32()));
        }
        Ok(settings)
    }

    /// A GOAWAY's last stream identifier.
    pub fn goaway_last_stream(&self) -> Result<u32, FrameError> {
        let payload = self.payload();
        if payload.len() < 8 {
            return Err(FrameError {
                code: FRAME_SIZE_ERROR,
                what: "GOAWAY too short".into(),
            });
        }
        Ok((&payload[..]).get_u32() & 0x7fff_ffff)
    }
}

/// Takes the next whole frame off the front of `buf`, if it has arrived. A frame longer than
/// `max_payload` (the receiver's SETTINGS_MAX_FRAME_SIZE) is an error, before any of it is
/// buffered.
pub fn parse(buf: &mut BytesMut, max_payload: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
    if len > max_payload {
        return Err(FrameError {
            code: FRAME_SIZE_ERROR,
            what: format!("frame of {len} bytes, over the limit of {max_payload}"),
        });
    }
    if buf.len() < HEADER_LEN + len {
        // Room for the rest, so the next read completes it without another copy.
        buf.reserve(HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    let kind = buf[3];
    let flags = buf[4];
    let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
    let raw = buf.split_to(HEADER_LEN + len).freeze();
    Ok(Some(Frame {
        kind,
        flags,
        stream,
        raw,
    }))
}

pub fn put_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(len <= MAX_PAYLOAD);
    out.put_u8((len >> 16) as u8);
    out.put_u8((len >> 8) as u8);
    out.put_u8(len as u8);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream & 0x7fff_ffff);
}

/// A header block as HEADERS and as many CONTINUATIONs as `max_frame` requires.
pub fn put_headers(
    out: &mut BytesMut,
    stream: u32,
    block: &[u8],
    end_stream: bool,
    max_frame: usize,
) {
    let mut chunks = block.chunks(max_frame.max(1)).peekable();
    let mut kind = HEADERS;
    let mut flags = if end_stream { END_STREAM } else { 0 };
    if block.is_empty() {
        put_header(out, 0, HEADERS, flags | END_HEADERS, stream);
        return;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        put_header(
            out,
            chunk.len(),
            kind,
            flags | if last { END_HEADERS } else { 0 },
            stream,
        );
        out.put_slice(chunk);
        kind = CONTINUATION;
        flags = 0;
    }
}

pub fn put_data(out: &mut BytesMut, stream: u32, data: &[u8], end_stream: bool) {
    put_header(
        out,
        data.len(),
        DATA,
        if end_stream { END_STREAM } else { 0 },
        stream,
    );
    out.put_slice(data);
}

pub fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_header(out, 4, WINDOW_UPDATE, 0, stream);
    out.put_u32(increment & 0x7fff_ffff);
}

pub fn put_rst_stream(out: &mut BytesMut, stream: u32, code: u32) {
    put_header(out, 4, RST_STREAM, 0, stream);
    out.put_u32(code);
}

pub fn put_goaway(out: &mut BytesMut, last_stream: u32, code: u32, debug: &[u8]) {
    put_header(out, 8 + debug.len(), GOAWAY, 0, 0);
    out.put_u32(last_stream & 0x7fff_ffff);
    out.put_u32(code);
    out.put_slice(debug);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_wait_for_their_whole_payload() {
        let mut out = BytesMut::new();
        put_data(&mut out, 3, b"hello", true);
        put_window_update(&mut out, 0, 70_000);
        let mut partial = BytesMut::from(&out[..7]);
        assert!(parse(&mut partial, 16).unwrap().is_none());
        assert!(
            parse(&mut out.clone(), 4).is_err(),
            "over the frame size limit"
        );
        let data = parse(&mut out, MAX_PAYLOAD).unwrap().unwrap();
        assert_eq!(
            (data.kind, data.stream, data.has(END_STREAM)),
            (DATA, 3, true)
        );
        assert_eq!(&data.data().unwrap()[..], b"hello");
        let update = parse(&mut out, MAX_PAYLOAD).unwrap().unwrap();
        assert_eq!(update.window_increment().unwrap(), 70_000);
        assert!(out.is_empty());
    }

    #[test]
    fn padding_and_priority_are_taken_off_fragments() {
        // HEADERS, PADDED|PRIORITY: pad length 2, 5 priority bytes, fragment "ab", 2 pad bytes.
        let mut out = BytesMut::new();
        put_header(
            &mut out,
            10,
            HEADERS,
            PADDED | PRIORITY_FLAG | END_HEADERS,
            1,
        );
        out.put_slice(&[2, 0, 0, 0, 0, 16, b'a', b'b', 0, 0]);
        let frame = parse(&mut out, MAX_PAYLOAD).unwrap().unwrap();
        assert_eq!(&frame.fragment().unwrap()[..], b"ab");
        let mut bad = BytesMut::new();
        put_header(&mut bad, 2, DATA, PADDED, 1);
        bad.put_slice(&[5, 0]);
        assert!(
            parse(&mut bad, MAX_PAYLOAD)
                .unwrap()
                .unwrap()
                .data()
                .is_err()
        );
    }

    #[test]
    fn long_header_blocks_continue() {
        let mut out = BytesMut::new();
        put_headers(&mut out, 5, &[7u8; 40], true, 16);
        let first = parse(&mut out, MAX_PAYLOAD).unwrap().unwrap();
        assert_eq!(
            (first.kind, first.has(END_STREAM), first.has(END_HEADERS)),
            (HEADERS, true, false)
        );
        let second = parse(&mut out, MAX_PAYLOAD).unwrap().unwrap();
        assert_eq!(
            (second.kind, second.has(END_HEADERS)),
            (CONTINUATION, false)
        );
        let third = parse(&mut out, MAX_PAYLOAD).unwrap().unwrap();
        assert_eq!(
            (third.kind, third.has(END_HEADERS), third.payload().len()),
            (CONTINUATION, true, 8)
        );
    }
}
