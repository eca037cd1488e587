//! The request the client writes to the local agent socket
//! (docs/qrexec.md §16): [`RequestFormat`] v2, v3 or v4 and the [`Trigger`]
//! codec.

use std::fmt;

use super::header::{c_string_tail, fixed_field, need, put_fixed, put_u32};
use super::*;

/// Which request the client writes to the local agent socket (docs/qrexec.md §16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestFormat {
    /// R4.0: a bare 128-byte `trigger_service_params`, no header.
    V2,
    /// R4.1/R4.2: `MSG_TRIGGER_SERVICE3` + 96 bytes + service name.
    V3,
    /// R4.3+: `MSG_TRIGGER_SERVICE4` + 160 bytes + service name.
    V4,
}

impl RequestFormat {
    /// The protocol version announced in HELLO with this format.
    pub fn protocol_version(self) -> u32 {
        match self {
            RequestFormat::V2 => QREXEC_PROTOCOL_V2,
            RequestFormat::V3 => QREXEC_PROTOCOL_V3,
            RequestFormat::V4 => QREXEC_PROTOCOL_V4,
        }
    }

    /// Longest target name that fits the target field (31 for v2, else 63).
    pub fn max_target_len(self) -> usize {
        match self {
            RequestFormat::V2 => DOMAIN_FIELD_SIZE_V2 - 1,
            _ => DOMAIN_FIELD_SIZE - 1,
        }
    }

    /// Size of the fixed part of the trigger (128, 96 or 160).
    pub fn params_size(self) -> usize {
        match self {
            RequestFormat::V2 => TRIGGER_V2_SIZE,
            RequestFormat::V3 => TRIGGER3_PARAMS_SIZE,
            RequestFormat::V4 => TRIGGER4_PARAMS_SIZE,
        }
    }
}

impl fmt::Display for RequestFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RequestFormat::V2 => "v2",
            RequestFormat::V3 => "v3",
            RequestFormat::V4 => "v4",
        })
    }
}

/// A service request as written to the local agent (docs/qrexec.md §5.5, §7.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// Which layout.
    pub format: RequestFormat,
    /// `source_domain` (v4 only; empty means "no source qube").
    pub source: Vec<u8>,
    /// `target_domain`.
    pub target: Vec<u8>,
    /// `request_id` (the client always writes `SOCKET`).
    pub request_id: Vec<u8>,
    /// `service_name` (`NAME[+ARG]`), without NUL.
    pub service: Vec<u8>,
}

impl Trigger {
    /// A request as qrexec-client-vm writes it: request id `SOCKET`.
    pub fn new(format: RequestFormat, target: &[u8], service: &[u8], source: &[u8]) -> Trigger {
        Trigger {
            format,
            source: source.to_vec(),
            target: target.to_vec(),
            request_id: REQUEST_ID_SOCKET.to_vec(),
            service: service.to_vec(),
        }
    }

    /// The exact bytes to write to the agent socket, in one buffer.
    ///
    /// Like the C client, fixed-size fields are truncated silently (target to
    /// 63 or 31 bytes, v2 service to 63, source to 63). Callers that want an
    /// error instead validate first ([`crate::names`]). Errors: a NUL byte in
    /// any field, a source qube with v2/v3, a v3/v4 service longer than
    /// [`MAX_SERVICE_NAME_LEN`].
    ///
    /// ```
    /// # use qrexec::proto::{RequestFormat, Trigger};
    /// let b = Trigger::new(RequestFormat::V4, b"work", b"qubes.Filecopy", b"").encode().unwrap();
    /// assert_eq!(&b[..8], &[0x13, 0x02, 0, 0, 0xaf, 0, 0, 0]);
    /// assert_eq!(b.len(), 8 + 175);
    /// ```
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut request_id = [0u8; IDENT_FIELD_SIZE];
        put_fixed("request_id", &mut request_id, &self.request_id, false)?;
        match self.format {
            RequestFormat::V2 => {
                if !self.source.is_empty() {
                    return Err(ProtoError::Unencodable {
                        what: "source_domain",
                        why: "only request format v4 has a source qube",
                    });
                }
                let mut b = vec![0u8; TRIGGER_V2_SIZE];
                put_fixed("service_name", &mut b[..64], &self.service, true)?;
                put_fixed("target_domain", &mut b[64..96], &self.target, true)?;
                b[96..128].copy_from_slice(&request_id);
                Ok(b)
            }
            RequestFormat::V3 | RequestFormat::V4 => {
                if self.service.contains(&0) {
                    return Err(ProtoError::Unencodable {
                        what: "service_name",
                        why: "contains a NUL byte",
                    });
                }
                if self.service.len() + 1 > MAX_SERVICE_NAME_LEN {
                    return Err(ProtoError::Unencodable {
                        what: "service_name",
                        why: "longer than MAX_SERVICE_NAME_LEN",
                    });
                }
                let params = self.format.params_size();
                let len = params + self.service.len() + 1;
                let (ty, offset) = if self.format == RequestFormat::V4 {
                    (MsgType::TriggerService4, DOMAIN_FIELD_SIZE)
                } else {
                    if !self.source.is_empty() {
                        return Err(ProtoError::Unencodable {
                            what: "source_domain",
                            why: "only request format v4 has a source qube",
                        });
                    }
                    (MsgType::TriggerService3, 0)
                };
                let mut b = Vec::with_capacity(MSG_HEADER_SIZE + len);
                put_u32(&mut b, ty.as_u32());
                put_u32(&mut b, len as u32);
                let mut fixed = vec![0u8; params];
                if self.format == RequestFormat::V4 {
                    put_fixed("source_domain", &mut fixed[..64], &self.source, true)?;
                }
                put_fixed(
                    "target_domain",
                    &mut fixed[offset..offset + 64],
                    &self.target,
                    true,
                )?;
                fixed[offset + 64..offset + 96].copy_from_slice(&request_id);
                b.extend_from_slice(&fixed);
                b.extend_from_slice(&self.service);
                b.push(0);
                Ok(b)
            }
        }
    }

    /// Decode a complete request of the given format, validating it like an
    /// agent/daemon would (docs/qrexec.md §7.2, §9.1): header type, length bounds,
    /// truncation, the service NUL rules. Fixed fields end at their first NUL
    /// (the last byte is forced to NUL). Trailing bytes are an error.
    pub fn decode(format: RequestFormat, b: &[u8]) -> Result<Trigger, ProtoError> {
        match format {
            RequestFormat::V2 => {
                need("trigger_service_params", b, TRIGGER_V2_SIZE)?;
                if b.len() > TRIGGER_V2_SIZE {
                    return Err(ProtoError::TrailingBytes {
                        what: "trigger_service_params",
                        extra: b.len() - TRIGGER_V2_SIZE,
                    });
                }
                Ok(Trigger {
                    format,
                    source: Vec::new(),
                    service: fixed_field(&b[..64]).to_vec(),
                    target: fixed_field(&b[64..96]).to_vec(),
                    request_id: fixed_field(&b[96..128]).to_vec(),
                })
            }
            RequestFormat::V3 | RequestFormat::V4 => {
                let hdr = MsgHeader::decode(b)?;
                let (expected, params) = if format == RequestFormat::V4 {
                    (MsgType::TriggerService4, TRIGGER4_PARAMS_SIZE)
                } else {
                    (MsgType::TriggerService3, TRIGGER3_PARAMS_SIZE)
                };
                if hdr.ty != expected.as_u32() {
                    return Err(ProtoError::WrongTriggerType {
                        ty: hdr.ty,
                        expected: expected.as_u32(),
                    });
                }
                let len = hdr.len as usize;
                if len <= params || len - params > MAX_SERVICE_NAME_LEN {
                    return Err(ProtoError::BadTriggerLength {
                        len: hdr.len,
                        min: params + 1,
                        max: params + MAX_SERVICE_NAME_LEN,
                    });
                }
                let body = &b[MSG_HEADER_SIZE..];
                need("trigger payload", body, len)?;
                if body.len() > len {
                    return Err(ProtoError::TrailingBytes {
                        what: "trigger",
                        extra: body.len() - len,
                    });
                }
                let (source, offset) = if format == RequestFormat::V4 {
                    (fixed_field(&body[..64]).to_vec(), 64)
                } else {
                    (Vec::new(), 0)
                };
                let target = fixed_field(&body[offset..offset + 64]).to_vec();
                let request_id = fixed_field(&body[offset + 64..offset + 96]).to_vec();
                let service = c_string_tail("service_name", &body[params..len])?;
                if service.is_empty() {
                    return Err(ProtoError::MalformedString {
                        what: "service_name",
                        why: "is empty",
                    });
                }
                Ok(Trigger {
                    format,
                    source,
                    target,
                    request_id,
                    service: service.to_vec(),
                })
            }
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::padded;

    /// docs/qrexec.md §5.5 example: v4 request for `work` / `qubes.Filecopy`.
    #[test]
    fn golden_trigger_v4_without_source() {
        let got = Trigger::new(RequestFormat::V4, b"work", b"qubes.Filecopy", b"")
            .encode()
            .unwrap();
        let mut want = vec![0x13, 0x02, 0, 0, 0xaf, 0, 0, 0];
        want.extend(padded(b"", 64));
        want.extend(padded(b"work", 64));
        want.extend(padded(b"SOCKET", 32));
        want.extend_from_slice(b"qubes.Filecopy\0");
        assert_eq!(got, want);
        assert_eq!(got.len(), 8 + 175);
    }

    #[test]
    fn golden_trigger_v4_with_source() {
        let got = Trigger::new(RequestFormat::V4, b"@dispvm:tpl", b"svc+arg", b"relay")
            .encode()
            .unwrap();
        let mut want = vec![0x13, 0x02, 0, 0];
        want.extend_from_slice(&(160u32 + 8).to_le_bytes());
        want.extend(padded(b"relay", 64));
        want.extend(padded(b"@dispvm:tpl", 64));
        want.extend(padded(b"SOCKET", 32));
        want.extend_from_slice(b"svc+arg\0");
        assert_eq!(got, want);
    }

    /// docs/qrexec.md §5.5: the v3 header is `12 02 00 00 | 6f 00 00 00`.
    #[test]
    fn golden_trigger_v3() {
        let got = Trigger::new(RequestFormat::V3, b"work", b"qubes.Filecopy", b"")
            .encode()
            .unwrap();
        let mut want = vec![0x12, 0x02, 0, 0, 0x6f, 0, 0, 0];
        want.extend(padded(b"work", 64));
        want.extend(padded(b"SOCKET", 32));
        want.extend_from_slice(b"qubes.Filecopy\0");
        assert_eq!(got, want);
    }

    #[test]
    fn golden_trigger_v2_has_no_header() {
        let got = Trigger::new(RequestFormat::V2, b"work", b"qubes.Filecopy", b"")
            .encode()
            .unwrap();
        let mut want = padded(b"qubes.Filecopy", 64);
        want.extend(padded(b"work", 32));
        want.extend(padded(b"SOCKET", 32));
        assert_eq!(got, want);
        assert_eq!(got.len(), 128);
    }

    #[test]
    fn trigger_truncates_like_strncpy() {
        let long = [b'a'; 100];
        // v4: target and source cut at 63, the 64th byte stays NUL.
        let b = Trigger::new(RequestFormat::V4, &long, b"s", &long)
            .encode()
            .unwrap();
        assert_eq!(&b[8..8 + 63], &long[..63]);
        assert_eq!(b[8 + 63], 0);
        assert_eq!(&b[72..72 + 63], &long[..63]);
        assert_eq!(b[72 + 63], 0);
        // v3: target cut at 63.
        let b = Trigger::new(RequestFormat::V3, &long, b"s", b"")
            .encode()
            .unwrap();
        assert_eq!(&b[8..8 + 63], &long[..63]);
        assert_eq!(b[8 + 63], 0);
        assert_eq!(b.len(), 8 + 96 + 2);
        // v2: service cut at 63, target at 31.
        let b = Trigger::new(RequestFormat::V2, &long, &long, b"")
            .encode()
            .unwrap();
        assert_eq!(&b[..63], &long[..63]);
        assert_eq!(b[63], 0);
        assert_eq!(&b[64..64 + 31], &long[..31]);
        assert_eq!(b[95], 0);
        assert_eq!(&b[96..102], b"SOCKET");
        // exact limits are not truncated
        let b = Trigger::new(RequestFormat::V2, &long[..31], &long[..63], b"")
            .encode()
            .unwrap();
        let t = Trigger::decode(RequestFormat::V2, &b).unwrap();
        assert_eq!(t.target, &long[..31]);
        assert_eq!(t.service, &long[..63]);
    }

    #[test]
    fn trigger_encode_errors() {
        assert!(matches!(
            Trigger::new(RequestFormat::V3, b"t", b"s", b"src").encode(),
            Err(ProtoError::Unencodable {
                what: "source_domain",
                ..
            })
        ));
        assert!(matches!(
            Trigger::new(RequestFormat::V2, b"t", b"s", b"src").encode(),
            Err(ProtoError::Unencodable {
                what: "source_domain",
                ..
            })
        ));
        assert!(
            Trigger::new(RequestFormat::V4, b"t", b"s\0x", b"")
                .encode()
                .is_err()
        );
        assert!(
            Trigger::new(RequestFormat::V4, b"t\0", b"s", b"")
                .encode()
                .is_err()
        );
        let huge = vec![b'a'; MAX_SERVICE_NAME_LEN];
        assert!(
            Trigger::new(RequestFormat::V4, b"t", &huge, b"")
                .encode()
                .is_err()
        );
        let ok = vec![b'a'; MAX_SERVICE_NAME_LEN - 1];
        assert!(
            Trigger::new(RequestFormat::V4, b"t", &ok, b"")
                .encode()
                .is_ok()
        );
    }

    #[test]
    fn trigger_roundtrip_and_decode_validation() {
        for f in [RequestFormat::V2, RequestFormat::V3, RequestFormat::V4] {
            let src: &[u8] = if f == RequestFormat::V4 { b"src" } else { b"" };
            let t = Trigger::new(f, b"@default", b"qubes.Svc+x", src);
            let b = t.encode().unwrap();
            assert_eq!(Trigger::decode(f, &b).unwrap(), t);
            // every truncation is an error, never a panic
            for n in 0..b.len() {
                assert!(Trigger::decode(f, &b[..n]).is_err(), "{f} len {n}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(matches!(
                Trigger::decode(f, &longer),
                Err(ProtoError::TrailingBytes { .. })
            ));
        }
        let b = Trigger::new(RequestFormat::V3, b"t", b"s", b"")
            .encode()
            .unwrap();
        assert!(matches!(
            Trigger::decode(RequestFormat::V4, &b),
            Err(ProtoError::WrongTriggerType { .. })
        ));
        // length equal to params size (no service at all)
        let mut b = vec![0x13, 2, 0, 0, 160, 0, 0, 0];
        b.extend(vec![0u8; 160]);
        assert!(matches!(
            Trigger::decode(RequestFormat::V4, &b),
            Err(ProtoError::BadTriggerLength { .. })
        ));
        // service not NUL-terminated / NUL in the middle / empty
        let mut b = Trigger::new(RequestFormat::V3, b"t", b"ab", b"")
            .encode()
            .unwrap();
        let last = b.len() - 1;
        b[last] = b'x';
        assert!(matches!(
            Trigger::decode(RequestFormat::V3, &b),
            Err(ProtoError::MalformedString { .. })
        ));
        b[last] = 0;
        b[last - 1] = 0;
        assert!(matches!(
            Trigger::decode(RequestFormat::V3, &b),
            Err(ProtoError::MalformedString { .. })
        ));
        let mut b = vec![0x12, 2, 0, 0, 97, 0, 0, 0];
        b.extend(vec![0u8; 97]);
        assert!(matches!(
            Trigger::decode(RequestFormat::V3, &b),
            Err(ProtoError::MalformedString {
                why: "is empty",
                ..
            })
        ));
    }
}
