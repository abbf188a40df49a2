//! The `--disk` and `--net` options: parsing their `key=value` lists into device
//! configurations, and the checks across devices (unique ids, taps and MACs, one device
//! per free interrupt line) that must pass before anything is created.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::net::{MacAddr, NetConfig};
use crate::vmm::layout::{CMDLINE_VIRTIO_DEVICES, MAX_VIRTIO_DEVICES};

/// How the guest finds its virtio-mmio devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VirtioDiscovery {
    /// In the ACPI DSDT (`LNRO0005` devices), which is where distribution kernels look.
    #[default]
    Acpi,
    /// `virtio_mmio.device=` entries on the kernel command line, for kernels without ACPI.
    /// The VM then has no ACPI tables at all, only the MP table: under ACPI's
    /// hardware-reduced model Linux routes only the interrupts the tables describe, so a
    /// command-line device's interrupt would never arrive.
    Cmdline,
}

impl std::fmt::Display for VirtioDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VirtioDiscovery::Acpi => "acpi",
            VirtioDiscovery::Cmdline => "cmdline",
        })
    }
}

impl FromStr for VirtioDiscovery {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "acpi" => Ok(VirtioDiscovery::Acpi),
            "cmdline" => Ok(VirtioDiscovery::Cmdline),
            other => Err(ConfigError::BadDiscovery(other.to_string())),
        }
    }
}

/// Splits `key=value,key=value` into pairs, refusing keys not in `known`, a key given
/// twice, and empty values. `option` names the flag in errors.
fn key_values<'a>(
    option: &'static str,
    arg: &'a str,
    known: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    let bad = |why: String| ConfigError::BadDevice {
        option,
        arg: arg.to_string(),
        why,
    };
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for item in arg.split(',') {
        let Some((key, value)) = item.split_once('=') else {
            return Err(bad(format!("'{item}' is not key=value")));
        };
        if !known.contains(&key) {
            return Err(bad(format!(
                "unknown key '{key}' (known: {})",
                known.join(", ")
            )));
        }
        if value.is_empty() {
            return Err(bad(format!("'{key}' has no value")));
        }
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(bad(format!("'{key}' is given twice")));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn value<'a>(pairs: &[(&str, &'a str)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// Parses `path=FILE[,readonly=on|off][,id=NAME]`; the id defaults to `disk<index>`. A
/// relative path is made absolute, so that a restore from another directory (or by
/// `host restore-all`) opens the same file.
pub fn parse_disk(arg: &str, index: usize) -> Result<BlockConfig, ConfigError> {
    const OPTION: &str = "--disk";
    let pairs = key_values(OPTION, arg, &["path", "readonly", "id"])?;
    let bad = |why: String| ConfigError::BadDevice {
        option: OPTION,
        arg: arg.to_string(),
        why,
    };
    let path = value(&pairs, "path").ok_or_else(|| bad("path=FILE is required".into()))?;
    let path = std::path::absolute(path)
        .map_err(|e| bad(format!("cannot make the path {path} absolute: {e}")))?;
    let read_only = match value(&pairs, "readonly") {
        None | Some("off") => false,
        Some("on") => true,
        Some(other) => return Err(bad(format!("readonly must be on or off, not '{other}'"))),
    };
    let id = value(&pairs, "id").map_or_else(|| format!("disk{index}"), str::to_string);
    // The guest reads the id as the disk's serial: at most 20 ASCII bytes (GET_ID).
    let printable = |c: char| c.is_ascii_graphic();
    if id.len() > 20 || !id.chars().all(printable) {
        return Err(bad(format!(
            "id '{id}' must be 1 to 20 printable ASCII characters without spaces"
        )));
    }
    Ok(BlockConfig {
        path,
        read_only,
        id,
    })
}

/// Parses `tap=NAME[,mac=MAC]`; the MAC defaults to a locally administered address
/// derived from the VM id and the interface's index, so it is stable across restarts.
pub fn parse_net(arg: &str, vm_id: &str, index: usize) -> Result<NetConfig, ConfigError> {
    const OPTION: &str = "--net";
    let pairs = key_values(OPTION, arg, &["tap", "mac"])?;
    let bad = |why: String| ConfigError::BadDevice {
        option: OPTION,
        arg: arg.to_string(),
        why,
    };
    let tap = value(&pairs, "tap").ok_or_else(|| bad("tap=NAME is required".into()))?;
    let mac = match value(&pairs, "mac") {
        Some(m) => m.parse::<MacAddr>().map_err(|e| bad(e.to_string()))?,
        None => default_mac(vm_id, index),
    };
    Ok(NetConfig {
        tap: tap.to_string(),
        mac,
    })
}

/// `02:57:xx:xx:xx:xx`: locally administered, unicast, the rest an FNV-1a hash of the VM
/// id and the interface index.
fn default_mac(vm_id: &str, index: usize) -> MacAddr {
    let mut hash: u32 = 0x811c_9dc5;
    for b in vm_id.bytes().chain((index as u32).to_le_bytes()) {
        hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let h = hash.to_be_bytes();
    MacAddr::from_bytes([0x02, 0x57, h[0], h[1], h[2], h[3]])
}

/// Checks the devices as a set: each disk id, disk file, tap and MAC at most once, and no
/// more devices than free interrupt lines.
pub fn check_devices(
    disks: &[BlockConfig],
    nets: &[NetConfig],
    discovery: VirtioDiscovery,
) -> Result<(), ConfigError> {
    let max = match discovery {
        VirtioDiscovery::Acpi => MAX_VIRTIO_DEVICES,
        VirtioDiscovery::Cmdline => CMDLINE_VIRTIO_DEVICES,
    };
    if disks.len() + nets.len() > max {
        return Err(ConfigError::TooManyDevices {
            count: disks.len() + nets.len(),
            max,
            discovery,
        });
    }
    for (i, d) in disks.iter().enumerate() {
        if disks[..i].iter().any(|o| o.id == d.id) {
            return Err(ConfigError::Duplicate {
                what: "disk id",
                value: d.id.clone(),
            });
        }
        if disks[..i].iter().any(|o| o.path == d.path) {
            return Err(ConfigError::Duplicate {
                what: "disk file",
                value: d.path.display().to_string(),
            });
        }
    }
    for (i, n) in nets.iter().enumerate() {
        if nets[..i].iter().any(|o| o.tap == n.tap) {
            return Err(ConfigError::Duplicate {
                what: "tap",
                value: n.tap.clone(),
            });
        }
        if nets[..i].iter().any(|o| o.mac == n.mac) {
            return Err(ConfigError::Duplicate {
                what: "MAC address",
                value: n.mac.to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn disks_parse_with_defaults_and_options() {
        let d = parse_disk("path=/tmp/a.img", 0).unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(!d.read_only);
        assert_eq!(d.id, "disk0");
        let d = parse_disk("path=/tmp/b.img,readonly=on,id=data", 3).unwrap();
        assert!(d.read_only);
        assert_eq!(d.id, "data");
        let d = parse_disk("id=x,path=rel.img", 1).unwrap();
        assert!(d.path.is_absolute(), "{:?}", d.path);
    }

    #[test]
    fn malformed_disks_are_refused_naming_the_problem() {
        for (arg, needle) in [
            ("", "not key=value"),
            ("/tmp/a.img", "not key=value"),
            ("readonly=on", "path=FILE is required"),
            ("path=", "has no value"),
            ("path=/a,path=/b", "given twice"),
            ("path=/a,readonly=yes", "on or off"),
            ("path=/a,size=4G", "unknown key 'size'"),
            ("path=/a,id=this-id-is-far-too-long-for-virtio", "1 to 20"),
            ("path=/a,id=has space", "1 to 20"),
        ] {
            let e = parse_disk(arg, 0).unwrap_err().to_string();
            assert!(e.contains(needle), "{arg:?}: {e}");
            assert!(e.contains("--disk"), "{arg:?}: {e}");
        }
    }

    #[test]
    fn nets_parse_with_a_stable_default_mac() {
        let n = parse_net("tap=wbtap0", "vm1", 0).unwrap();
        assert_eq!(n.tap, "wbtap0");
        assert_eq!(n.mac, parse_net("tap=other", "vm1", 0).unwrap().mac);
        assert_ne!(n.mac, parse_net("tap=wbtap0", "vm1", 1).unwrap().mac);
        assert_ne!(n.mac, parse_net("tap=wbtap0", "vm2", 0).unwrap().mac);
        let bytes = n.mac.bytes();
        assert_eq!(bytes[0] & 0b11, 0b10, "locally administered unicast");
        let n = parse_net("tap=t,mac=52:54:00:12:34:56", "vm1", 0).unwrap();
        assert_eq!(n.mac.to_string(), "52:54:00:12:34:56");
    }

    #[test]
    fn malformed_nets_are_refused() {
        for (arg, needle) in [
            ("mac=52:54:00:12:34:56", "tap=NAME is required"),
            ("tap=t,mac=52:54:00:12:34", "52:54:00:12:34"),
            ("tap=t,mac=zz:54:00:12:34:56", "zz:54"),
            ("tap=t,queues=2", "unknown key"),
        ] {
            let e = parse_net(arg, "vm", 0).unwrap_err().to_string();
            assert!(e.contains(needle), "{arg:?}: {e}");
            assert!(e.contains("--net"), "{arg:?}: {e}");
        }
    }

    #[test]
    fn duplicates_and_too_many_devices_are_refused() {
        let a = parse_disk("path=/a,id=x", 0).unwrap();
        let b = parse_disk("path=/b,id=x", 1).unwrap();
        let e = check_devices(&[a.clone(), b], &[], VirtioDiscovery::Acpi).unwrap_err();
        assert_eq!(e.to_string(), "disk id 'x' is used twice");
        let c = parse_disk("path=/a,id=y", 1).unwrap();
        assert!(check_devices(&[a.clone(), c], &[], VirtioDiscovery::Acpi).is_err());
        let n0 = parse_net("tap=t0", "vm", 0).unwrap();
        let n1 = parse_net("tap=t0", "vm", 1).unwrap();
        assert!(check_devices(&[], &[n0.clone(), n1], VirtioDiscovery::Acpi).is_err());
        let same_mac = parse_net("tap=t1", "vm", 0).unwrap();
        assert!(check_devices(&[], &[n0, same_mac], VirtioDiscovery::Acpi).is_err());

        let many: Vec<_> = (0..=CMDLINE_VIRTIO_DEVICES)
            .map(|i| parse_disk(&format!("path=/d{i}"), i).unwrap())
            .collect();
        check_devices(&many, &[], VirtioDiscovery::Acpi).unwrap();
        let e = check_devices(&many, &[], VirtioDiscovery::Cmdline).unwrap_err();
        assert!(e.to_string().contains("at most 8"), "{e}");
    }

    #[test]
    fn discovery_modes_parse() {
        assert_eq!("acpi".parse(), Ok(VirtioDiscovery::Acpi));
        assert_eq!("cmdline".parse(), Ok(VirtioDiscovery::Cmdline));
        assert!("pci".parse::<VirtioDiscovery>().is_err());
    }
}
