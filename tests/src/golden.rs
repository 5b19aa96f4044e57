//! The golden byte sequences of ipc-protocol.md section 8: what a client sends, what the
//! gateway answers, and whether it closes the connection. The conformance tests check each row
//! against the stub daemon; the chaos soak sends the rows that are garbage to a loaded daemon.

/// What the gateway answers to one golden row.
#[derive(Clone, Copy, Debug)]
pub enum Answer {
    /// Exactly `00 00 00 06 01 F1`.
    Pong,
    /// A 0x11 frame with this code.
    Error(u64),
    /// A 0x10 frame with the stub reply echoing `{}`.
    StubEmptyObject,
}

/// One row: the bytes a client sends and what must follow.
pub struct Row {
    pub name: &'static str,
    pub bytes: &'static [u8],
    pub answer: Answer,
    /// The gateway closes the connection after answering.
    pub closes: bool,
}

/// ipc-protocol.md section 8, row by row.
pub const GOLDEN: &[Row] = &[
    Row {
        name: "PING",
        bytes: &[0x00, 0x00, 0x00, 0x06, 0x01, 0xF0],
        answer: Answer::Pong,
        closes: false,
    },
    Row {
        name: "unknown type 0x99",
        bytes: &[0x00, 0x00, 0x00, 0x06, 0x01, 0x99],
        answer: Answer::Error(2),
        closes: false,
    },
    Row {
        name: "version 2",
        bytes: &[0x00, 0x00, 0x00, 0x06, 0x02, 0xF0],
        answer: Answer::Error(1),
        closes: true,
    },
    Row {
        name: "length 5",
        bytes: &[0x00, 0x00, 0x00, 0x05, 0x01, 0xF0],
        answer: Answer::Error(4),
        closes: true,
    },
    Row {
        name: "length 4 MiB + 1 (header only)",
        bytes: &[0x00, 0x40, 0x00, 0x01, 0x01, 0x01],
        answer: Answer::Error(3),
        closes: true,
    },
    Row {
        name: "raw JSON text",
        bytes: br#"{"task":"x"}"#,
        answer: Answer::Error(3),
        closes: true,
    },
    Row {
        name: "TASK_SUBMIT {}",
        bytes: &[0x00, 0x00, 0x00, 0x08, 0x01, 0x01, 0x7B, 0x7D],
        answer: Answer::StubEmptyObject,
        closes: false,
    },
];

/// The row named `name`; panics if there is none.
pub fn row(name: &str) -> &'static Row {
    GOLDEN
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no golden row named {name:?}"))
}
