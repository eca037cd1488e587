//! Protocol constants (docs/qrexec.md §3): versions, size limits, ports,
//! exit statuses, and the sizes of the fixed structures of docs/qrexec.md §5.

/// Protocol version 1 (R2, obsolete file-descriptor passing).
pub const QREXEC_PROTOCOL_V1: u32 = 1;
/// Protocol version 2 (R3.0 – R4.0).
pub const QREXEC_PROTOCOL_V2: u32 = 2;
/// Protocol version 3 (R4.1 – R4.2).
pub const QREXEC_PROTOCOL_V3: u32 = 3;
/// Protocol version 4 (R4.3+).
pub const QREXEC_PROTOCOL_V4: u32 = 4;
/// Lowest version a data-channel peer may negotiate (docs/qrexec.md §6 rule 3).
pub const MIN_DATA_PROTOCOL_VERSION: u32 = QREXEC_PROTOCOL_V2;

/// Data payload limit when the negotiated version is below 3.
pub const MAX_DATA_CHUNK_V2: usize = 4096;
/// Data payload limit when the negotiated version is 3 or more.
pub const MAX_DATA_CHUNK_V3: usize = 65536;
/// Upper bound on the variable part of TRIGGER3/TRIGGER4 accepted by agents.
pub const MAX_SERVICE_NAME_LEN: usize = 65000;
/// Upper bound on an `MSG_EXEC_CMDLINE` payload from dom0 clients.
pub const MAX_QREXEC_CMD_LEN: usize = 65535;
/// Port of the control vchan (agent ↔ daemon).
pub const VCHAN_BASE_PORT: u32 = 512;
/// First data vchan port.
pub const VCHAN_BASE_DATA_PORT: u32 = 513;
/// Size of the agent connection table and daemon port tables.
pub const MAX_FDS: usize = 256;
/// Default data vchan ring size per direction (`VCHAN_BUFFER_SIZE`).
pub const VCHAN_BUFFER_SIZE: usize = 65536;
/// Largest ring a vchan can have (2^20); `--buffer-size` above it fails.
pub const MAX_VCHAN_BUFFER_SIZE: usize = 1 << 20;
/// Ring size of the control vchan; a trigger must fit in it with its header.
pub const CONTROL_RING_SIZE: usize = 4096;

/// Exit status for a qrexec infrastructure failure.
pub const QREXEC_EXIT_PROBLEM: i32 = 125;
/// Exit status for a refused call (the client prints `Request refused`).
pub const QREXEC_EXIT_REQUEST_REFUSED: i32 = 126;
/// Exit status when the call was allowed but the service does not exist.
pub const QREXEC_EXIT_SERVICE_NOT_FOUND: i32 = 127;

/// Prefix of service command lines (`QUBESRPC`).
pub const RPC_REQUEST_COMMAND: &str = "QUBESRPC";
/// Prefix that marks a command as not needing a GUI session.
pub const NOGUI_CMD_PREFIX: &str = "nogui:";
/// Default path of the local agent socket.
pub const QREXEC_AGENT_TRIGGER_PATH: &str = "/var/run/qubes/qrexec-agent";

/// Size of [`MsgHeader`](super::MsgHeader) on the wire.
pub const MSG_HEADER_SIZE: usize = 8;
/// Size of `peer_info` (the HELLO payload).
pub const PEER_INFO_SIZE: usize = 4;
/// Size of the fixed part of `exec_params` (the connection parameters).
pub const EXEC_PARAMS_SIZE: usize = 8;
/// Size of `service_params` (a request identifier).
pub const SERVICE_PARAMS_SIZE: usize = 32;
/// Size of the v2 `trigger_service_params` (sent without a header).
pub const TRIGGER_V2_SIZE: usize = 128;
/// Size of the fixed part of `trigger_service_params3`.
pub const TRIGGER3_PARAMS_SIZE: usize = 96;
/// Size of the fixed part of `trigger_service_params4`.
pub const TRIGGER4_PARAMS_SIZE: usize = 160;
/// Size of a domain-name field in v3/v4 triggers.
pub const DOMAIN_FIELD_SIZE: usize = 64;
/// Size of the target-domain field in a v2 trigger.
pub const DOMAIN_FIELD_SIZE_V2: usize = 32;
/// Size of the service-name field in a v2 trigger.
pub const SERVICE_FIELD_SIZE_V2: usize = 64;
/// Size of a request identifier field.
pub const IDENT_FIELD_SIZE: usize = 32;
/// The request id the client always writes; the agent overwrites it.
pub const REQUEST_ID_SOCKET: &[u8] = b"SOCKET";
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_pinned() {
        assert_eq!(MAX_DATA_CHUNK_V2, 4096);
        assert_eq!(MAX_DATA_CHUNK_V3, 65536);
        assert_eq!(MAX_SERVICE_NAME_LEN, 65000);
        assert_eq!(VCHAN_BASE_PORT, 512);
        assert_eq!(VCHAN_BASE_DATA_PORT, 513);
        assert_eq!(QREXEC_EXIT_PROBLEM, 125);
        assert_eq!(QREXEC_EXIT_REQUEST_REFUSED, 126);
        assert_eq!(QREXEC_EXIT_SERVICE_NOT_FOUND, 127);
        assert_eq!(QREXEC_AGENT_TRIGGER_PATH, "/var/run/qubes/qrexec-agent");
        assert_eq!(TRIGGER_V2_SIZE, 64 + 32 + 32);
        assert_eq!(TRIGGER3_PARAMS_SIZE, 64 + 32);
        assert_eq!(TRIGGER4_PARAMS_SIZE, 64 + 64 + 32);
    }
}
