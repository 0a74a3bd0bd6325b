//! `UniqueId`'s text form, which the two-rank program hands from rank 0 to
//! the others through a file: a round trip, and typed errors for text that
//! is not an id.
#![cfg(not(feature = "loom"))]

use segment_registry_nccl::real::UniqueId;
use segment_registry_nccl::BackendError;

fn parse_error(s: &str) -> String {
    match UniqueId::from_hex(s) {
        Err(BackendError::InvalidArgument {
            call: "ncclUniqueId",
            reason,
        }) => reason,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// 256 hex characters are an id and print back the same; its `Debug`
/// shows the first 8 bytes only.
#[test]
fn an_id_round_trips_through_its_hex_form() {
    let hex: String = (0..=255u8).take(128).map(|b| format!("{b:02x}")).collect();
    let id = UniqueId::from_hex(&format!("  {hex}\n")).unwrap();
    assert_eq!(id.to_hex(), hex);
    assert_eq!(format!("{id:?}"), "UniqueId(0001020304050607…)");
}

/// A wrong length, a non-ASCII character (even at the right byte length)
/// and a non-hex pair are refused with what is wrong.
#[test]
fn text_that_is_not_an_id_is_refused_by_name() {
    assert_eq!(
        parse_error("abcd"),
        "expected 256 hex characters, got 4 characters"
    );
    let wide = format!("{}é", "0".repeat(254));
    assert_eq!(wide.len(), 256);
    assert_eq!(
        parse_error(&wide),
        "expected 256 hex characters, got 256 characters"
    );
    let mut bad = "0".repeat(256);
    bad.replace_range(10..12, "zz");
    assert_eq!(parse_error(&bad), "not hex at byte 5: \"zz\"");
}
