//! qrexec messages on blocking byte streams (the dom0 `qrexec.<domid>`
//! sockets): whole-message writes and bounded reads.

use qrexec::proto::{MSG_HEADER_SIZE, MsgHeader, MsgType, encode_data, encode_hello};
use std::io::{self, Read, Write};

/// Version dom0 clients announce on the daemon socket
/// (`QREXEC_CLIENT_PROTOCOL_VERSION`, docs/qrexec.md §6).
pub const CLIENT_PROTOCOL_VERSION: u32 = 3;

/// Write a whole message in one `write_all`.
pub fn write_msg(w: &mut impl Write, ty: MsgType, payload: &[u8]) -> io::Result<()> {
    w.write_all(&encode_data(ty, payload))
}

/// Read one message whose payload is at most `max_len` bytes.
pub fn read_msg(r: &mut impl Read, max_len: usize) -> io::Result<(MsgHeader, Vec<u8>)> {
    let mut h = [0u8; MSG_HEADER_SIZE];
    r.read_exact(&mut h)?;
    let hdr = MsgHeader::decode(&h).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if hdr.len as usize > max_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "message type {:#x} with {} bytes (at most {max_len} allowed)",
                hdr.ty, hdr.len
            ),
        ));
    }
    let mut payload = vec![0u8; hdr.len as usize];
    r.read_exact(&mut payload)?;
    Ok((hdr, payload))
}

/// Read a HELLO and return the peer's version (type 0x300, len 4, else an
/// error).
pub fn read_hello(r: &mut impl Read) -> io::Result<u32> {
    let (hdr, payload) = read_msg(r, 4)?;
    if hdr.ty != MsgType::Hello.as_u32() || payload.len() != 4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected HELLO, got type {:#x} len {}", hdr.ty, hdr.len),
        ));
    }
    Ok(u32::from_le_bytes([
        payload[0], payload[1], payload[2], payload[3],
    ]))
}

/// Send our HELLO.
pub fn write_hello(w: &mut impl Write, version: u32) -> io::Result<()> {
    w.write_all(&encode_hello(version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_reads() {
        let m = qrexec::proto::encode_data(MsgType::ServiceRefused, &[0u8; 32]);
        let (h, p) = read_msg(&mut &m[..], 32).unwrap();
        assert_eq!(h.ty, 0x203);
        assert_eq!(p.len(), 32);
        assert!(read_msg(&mut &m[..], 31).is_err());
        assert!(read_msg(&mut &m[..20], 32).is_err());
        let mut hello = Vec::new();
        write_hello(&mut hello, 3).unwrap();
        assert_eq!(read_hello(&mut &hello[..]).unwrap(), 3);
        assert!(read_hello(&mut &m[..]).is_err());
    }
}
