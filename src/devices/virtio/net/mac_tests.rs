use super::*;

fn bincode_config() -> impl bincode::config::Config {
    // As src/snapshot/format.rs encodes snapshot payloads.
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
}

#[test]
fn parses_six_hex_groups_in_either_case_and_prints_lowercase() {
    let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
    assert_eq!(mac.bytes(), [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
    assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
    assert_eq!(format!("{mac:?}"), "MacAddr(52:54:00:ab:cd:0f)");
    assert_eq!(MacAddr::from_bytes(mac.bytes()), mac);
}

#[test]
fn refuses_anything_but_six_two_digit_hex_groups() {
    for input in [
        "",
        "52:54:00:12:34",
        "52:54:00:12:34:56:78",
        "52:54:00:12:34:5g",
        "52:54:00:12:34:5",
        "52:54:00:12:34:567",
        "52-54-00-12-34-56",
        "52:54:00:12:34:56:",
        ":52:54:00:12:34:56",
        "52:54:00:12:34:+6",
        " 52:54:00:12:34:56",
        "525400123456",
    ] {
        let e = input.parse::<MacAddr>().unwrap_err();
        assert!(matches!(e, MacAddrError::Format { .. }), "{input:?}: {e}");
        assert!(e.to_string().contains(&format!("{input:?}")), "{e}");
    }
}

#[test]
fn refuses_multicast_broadcast_and_zero_naming_the_input() {
    for input in [
        "01:00:5e:00:00:01",
        "ff:ff:ff:ff:ff:ff",
        "33:33:00:00:00:01",
    ] {
        let e = input.parse::<MacAddr>().unwrap_err();
        assert!(matches!(e, MacAddrError::Multicast { .. }), "{input}: {e}");
        assert!(e.to_string().contains(input), "{e}");
        assert!(e.to_string().contains("multicast"), "{e}");
    }
    let e = "00:00:00:00:00:00".parse::<MacAddr>().unwrap_err();
    assert!(matches!(e, MacAddrError::Zero { .. }), "{e}");
    // Locally administered unicast is fine.
    assert!("02:00:00:00:00:01".parse::<MacAddr>().is_ok());
}

#[test]
fn json_round_trip_uses_the_text_form_and_checks_it() {
    let mac: MacAddr = "02:57:de:ad:be:ef".parse().unwrap();
    let json = serde_json::to_string(&mac).unwrap();
    assert_eq!(json, "\"02:57:de:ad:be:ef\"");
    assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), mac);

    let e = serde_json::from_str::<MacAddr>("\"ff:ff:ff:ff:ff:ff\"").unwrap_err();
    assert!(e.to_string().contains("multicast"), "{e}");
    assert!(serde_json::from_str::<MacAddr>("\"52:54\"").is_err());
    assert!(serde_json::from_str::<MacAddr>("[82,84,0,18,52,86]").is_err());
}

#[test]
fn bincode_round_trip_as_in_snapshots() {
    let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
    let bytes = bincode::serde::encode_to_vec(mac, bincode_config()).unwrap();
    let (back, used): (MacAddr, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode_config()).unwrap();
    assert_eq!((back, used), (mac, bytes.len()));

    let bad = bincode::serde::encode_to_vec("01:00:00:00:00:01", bincode_config()).unwrap();
    let decoded: Result<(MacAddr, usize), _> =
        bincode::serde::decode_from_slice(&bad, bincode_config());
    assert!(decoded.is_err());
}
