//! Batches of data from the edge, and the anchors' answers to them: any
//! input decodes to a batch within the bounds, or to an error, never a
//! panic; what decodes can be encoded again and decodes to the same
//! records (values as the same numbers, or the same bytes); the signed
//! part is everything but the signature. An answer that decodes encodes
//! back to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

use uplink::batch::{SIGNATURE, decode};

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = uplink::wire::Answer::decode(data) {
        assert_eq!(uplink::wire::Answer::decode(&a.encode()), Ok(a));
    }
    let Ok(u) = decode(data) else { return };
    assert_eq!(u.signed.len() + SIGNATURE, data.len());
    assert!(u.batch.records() <= uplink::batch::MAX_RECORDS);
    let again = u.batch.encode(|_| u.signature).expect("a decoded batch encodes");
    let back = decode(&again).expect("and decodes again").batch;
    assert_eq!(back.series.len(), u.batch.series.len());
    for (a, b) in u.batch.series.iter().zip(&back.series) {
        assert_eq!((&a.name, a.kind, a.records.len()), (&b.name, b.kind, b.records.len()));
        for (r, s) in a.records.iter().zip(&b.records) {
            assert_eq!((r.seq, r.at_ms), (s.seq, s.at_ms));
            let num = |v: &[u8]| std::str::from_utf8(v).ok()?.parse::<f64>().ok();
            assert!(r.value == s.value || (num(&r.value).is_some() && num(&r.value) == num(&s.value)));
        }
    }
});
