//! Follows WebSocket frame boundaries in a byte stream without buffering it
//! (RFC 6455 §5.2), so the tunnel knows when it may inject a close frame and
//! can count messages. Extensions such as permessage-deflate only set RSV
//! bits and do not change framing.

#[derive(Debug, Clone)]
enum State {
    Header { buf: [u8; 14], have: u8 },
    Payload { remaining: u64 },
}

#[derive(Debug, Clone)]
pub struct FrameTracker {
    state: State,
    /// Complete data messages seen (final frames of text, binary or continuation).
    pub messages: u64,
    /// A close frame passed this way.
    pub closed: bool,
}

impl Default for FrameTracker {
    fn default() -> Self {
        FrameTracker {
            state: State::Header {
                buf: [0; 14],
                have: 0,
            },
            messages: 0,
            closed: false,
        }
    }
}

/// Header length from the second header byte (mask bit and length code).
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
}

impl FrameTracker {
    /// True between frames: a frame may be inserted here.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Header { have: 0, .. })
    }

    /// May the proxy send its own close frame (1001) on this stream now:
    /// between frames, and no close already passed this way.
    pub fn may_close(&self) -> bool {
        self.at_boundary() && !self.closed
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Payload { remaining } => {
                    let n = (*remaining).min(data.len() as u64) as usize;
                    data = &data[n..];
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        self.state = State::Header {
                            buf: [0; 14],
                            have: 0,
                        };
                    }
                }
                State::Header { buf, have } => {
                    let need = if *have < 2 { 2 } else { header_len(buf[1]) };
                    let take = (need - *have as usize).min(data.len());
                    buf[*have as usize..*have as usize + take].copy_from_slice(&data[..take]);
                    *have += take as u8;
                    data = &data[take..];
                    if (*have as usize) < need {
                        continue;
                    }
                    if need == 2 && header_len(buf[1]) > 2 {
                        continue; // now we know the full header length
                    }
                    let (b0, b1) = (buf[0], buf[1]);
                    let len = match b1 & 0x7f {
                        126 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
                        127 => u64::from_be_bytes(buf[2..10].try_into().unwrap_or([0; 8])),
                        n => u64::from(n),
                    };
                    let opcode = b0 & 0x0f;
                    if b0 & 0x80 != 0 && opcode < 0x8 {
                        self.messages += 1;
                    }
                    if opcode == 0x8 {
                        self.closed = true;
                    }
                    self.state = if len == 0 {
                        State::Header {
                            buf: [0; 14],
                            have: 0,
                        }
                    } else {
                        State::Payload { remaining: len }
                    };
                }
            }
        }
    }
}

/// A close frame with `code` and `reason`; masked when sent toward a server.
pub fn close_frame(code: u16, reason: &str, masked: bool) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason);
    let mut out = Vec::with_capacity(6 + payload.len());
    out.push(0x88);
    if masked {
        let key = fastrand::u32(..).to_be_bytes();
        out.push(0x80 | payload.len() as u8);
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.push(payload.len() as u8);
        out.extend_from_slice(&payload);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, len: usize, masked: bool) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if masked { 0x80 } else { 0 };
        if len < 126 {
            v.push(m | len as u8);
        } else if len < 65536 {
            v.push(m | 126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            v.push(m | 127);
            v.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            v.extend_from_slice(&[1, 2, 3, 4]);
        }
        v.extend(std::iter::repeat_n(7u8, len));
        v
    }

    #[test]
    fn tracks_boundaries_across_any_split() {
        let mut stream = Vec::new();
        stream.extend(frame(true, 1, 5, true));
        stream.extend(frame(false, 2, 300, false));
        stream.extend(frame(true, 0, 70_000, true));
        stream.extend(frame(true, 9, 0, false));
        stream.extend(frame(true, 8, 2, true));
        for chunk in [1usize, 2, 3, 7, 64, 1000, stream.len()] {
            let mut t = FrameTracker::default();
            for c in stream.chunks(chunk) {
                t.feed(c);
            }
            assert!(t.at_boundary(), "chunk {chunk}");
            assert_eq!(t.messages, 2, "chunk {chunk}");
            assert!(t.closed);
        }
        let mut t = FrameTracker::default();
        t.feed(&stream[..10]);
        assert!(!t.at_boundary());
    }

    #[test]
    fn close_frames_parse_back() {
        for masked in [false, true] {
            let f = close_frame(1001, "going away", masked);
            let mut t = FrameTracker::default();
            t.feed(&f);
            assert!(t.at_boundary() && t.closed);
            assert_eq!(f[0], 0x88);
            let payload: Vec<u8> = if masked {
                f[6..]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ f[2 + i % 4])
                    .collect()
            } else {
                f[2..].to_vec()
            };
            assert_eq!(&payload[..2], &1001u16.to_be_bytes());
            assert_eq!(&payload[2..], b"going away");
        }
    }
}
