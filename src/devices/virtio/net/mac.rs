//! The MAC address a virtio-net device reports to its driver.
//!
//! Written and read as six two-digit hex groups separated by colons (`52:54:00:12:34:56`),
//! in the command line, the JSON configuration and snapshots alike. Text from a user or a
//! file goes through [`FromStr`], which refuses what a network card cannot use as its own
//! address: multicast (and broadcast) addresses and the all-zero address.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A unicast Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacAddrError {
    #[error(
        "{input:?} is not a MAC address: write six two-digit hex numbers separated by \
         colons, e.g. 52:54:00:12:34:56"
    )]
    Format { input: String },
    #[error(
        "MAC address {input} is a multicast address (the lowest bit of its first byte is \
         set); give a unicast address, e.g. 52:54:00:12:34:56 or 02:xx:xx:xx:xx:xx"
    )]
    Multicast { input: String },
    #[error("MAC address {input} is all zeros, which no network card may use; give another")]
    Zero { input: String },
}

impl MacAddr {
    /// An address the VMM makes up itself (a default derived from the VM id). User input
    /// goes through [`FromStr`] instead, which checks the address is usable.
    pub const fn from_bytes(bytes: [u8; 6]) -> Self {
        Self(bytes)
    }

    pub const fn bytes(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = MacAddrError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let format = || MacAddrError::Format {
            input: input.to_string(),
        };
        let mut bytes = [0u8; 6];
        let mut groups = input.split(':');
        for byte in &mut bytes {
            let group = groups.next().ok_or_else(format)?;
            // from_str_radix alone would also take "+f" or a single digit.
            if group.len() != 2 || !group.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(format());
            }
            *byte = u8::from_str_radix(group, 16).map_err(|_| format())?;
        }
        if groups.next().is_some() {
            return Err(format());
        }
        if bytes[0] & 1 != 0 {
            return Err(MacAddrError::Multicast {
                input: input.to_string(),
            });
        }
        if bytes == [0; 6] {
            return Err(MacAddrError::Zero {
                input: input.to_string(),
            });
        }
        Ok(Self(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[path = "mac_tests.rs"]
mod tests;
