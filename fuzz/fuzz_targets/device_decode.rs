//! What a field device answers: registers decoded with any profile
//! resource (type, swaps, scale, length), and setpoint values encoded.
#![no_main]

use crdt_state::fleet::device::{Access, Resource, Table, ValueType, check_setpoint, decode};
use libfuzzer_sys::fuzz_target;

const TYPES: [ValueType; 11] = [
    ValueType::Bool,
    ValueType::Int16,
    ValueType::Uint16,
    ValueType::Int32,
    ValueType::Uint32,
    ValueType::Int64,
    ValueType::Uint64,
    ValueType::Float32,
    ValueType::Float64,
    ValueType::String,
    ValueType::Float64,
];

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let raw = TYPES[usize::from(data[0]) % TYPES.len()];
    let value = TYPES[usize::from(data[1]) % TYPES.len()];
    let flags = data[2];
    let r = Resource {
        name: "r".into(),
        table: Some(Table::HoldingRegisters),
        offset: 0,
        node_id: None,
        raw_type: Some(raw),
        value_type: value,
        length: Some(u16::from(data[3] % 16)),
        byte_swap: flags & 1 != 0,
        word_swap: flags & 2 != 0,
        scale: (flags & 4 != 0).then_some(0.1),
        value_offset: (flags & 8 != 0).then_some(-40.0),
        access: Access::ReadWrite,
        units: None,
        minimum: (flags & 16 != 0).then_some(-1e6),
        maximum: (flags & 32 != 0).then_some(1e6),
        report: false,
    };
    let words: Vec<u16> = data[4..]
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
        .collect();
    let _ = decode(&r, &words);
    if let Ok(text) = std::str::from_utf8(&data[4..])
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(text)
    {
        let _ = check_setpoint(&r, &v);
    }
});
