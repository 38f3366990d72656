//! Vendor identity: which vendor a source address belongs to on plain
//! Modbus/TCP listeners, and (in `certificate`) which certificate fields
//! identify a vendor on MODBUS/TCP Security listeners. Sources of two vendors
//! must not overlap, so a lookup is a binary search over disjoint address
//! ranges.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

pub mod certificate;
#[cfg(test)]
pub(crate) mod test_pki;

/// Two networks of different owners that share addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOverlap {
    pub first: (IpNet, usize),
    pub second: (IpNet, usize),
}

impl fmt::Display for SourceOverlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of owner {} overlaps {} of owner {}",
            self.second.0, self.second.1, self.first.0, self.first.1
        )
    }
}

impl std::error::Error for SourceOverlap {}

/// Disjoint, sorted, inclusive address ranges of one address family, each
/// with an owner.
#[derive(Debug, Clone, Default)]
struct RangeTable<T> {
    ranges: Box<[(T, T, usize)]>,
}

impl<T: Copy + Ord> RangeTable<T> {
    /// Sorts and merges ranges. Overlapping ranges of the same owner merge;
    /// of different owners they are an error.
    fn build(mut entries: Vec<(T, T, usize, IpNet)>) -> Result<Self, SourceOverlap> {
        entries.sort_by_key(|&(start, end, owner, _)| (start, end, owner));
        let mut ranges: Vec<(T, T, usize)> = Vec::with_capacity(entries.len());
        let mut last_net: Option<IpNet> = None;
        for (start, end, owner, net) in entries {
            if let (Some(last), Some(previous)) = (ranges.last_mut(), last_net) {
                if start <= last.1 {
                    if owner != last.2 {
                        return Err(SourceOverlap {
                            first: (previous, last.2),
                            second: (net, owner),
                        });
                    }
                    // Keep the network that reaches furthest, so that a
                    // later overlap is reported against a network it touches.
                    if end > last.1 {
                        last.1 = end;
                        last_net = Some(net);
                    }
                    continue;
                }
            }
            ranges.push((start, end, owner));
            last_net = Some(net);
        }
        Ok(RangeTable {
            ranges: ranges.into_boxed_slice(),
        })
    }

    fn lookup(&self, address: T) -> Option<usize> {
        let after = self.ranges.partition_point(|range| range.0 <= address);
        let (_, end, owner) = *self.ranges.get(after.checked_sub(1)?)?;
        (address <= end).then_some(owner)
    }
}

/// Maps source addresses to the owner of the network that contains them.
#[derive(Debug, Clone, Default)]
pub struct SourceIndex {
    v4: RangeTable<u32>,
    v6: RangeTable<u128>,
}

impl SourceIndex {
    /// Builds the index from networks and their owners, such as vendor ids.
    /// Host bits of a network are ignored.
    pub fn new(entries: impl IntoIterator<Item = (IpNet, usize)>) -> Result<Self, SourceOverlap> {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (net, owner) in entries {
            match net {
                IpNet::V4(net4) => v4.push((
                    u32::from(net4.network()),
                    u32::from(net4.broadcast()),
                    owner,
                    net,
                )),
                IpNet::V6(net6) => v6.push((
                    u128::from(net6.network()),
                    u128::from(net6.broadcast()),
                    owner,
                    net,
                )),
            }
        }
        Ok(SourceIndex {
            v4: RangeTable::build(v4)?,
            v6: RangeTable::build(v6)?,
        })
    }

    /// Returns the owner of the network containing `address`. An IPv4 address
    /// mapped into IPv6 (`::ffff:a.b.c.d`, as a dual-stack socket reports it)
    /// is looked up as IPv4.
    pub fn lookup(&self, address: IpAddr) -> Option<usize> {
        match address.to_canonical() {
            IpAddr::V4(v4) => self.v4.lookup(u32::from(v4)),
            IpAddr::V6(v6) => self.v6.lookup(u128::from(v6)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.ranges.is_empty() && self.v6.ranges.is_empty()
    }
}

/// A set of networks, such as the `when.sources` of a rule.
#[derive(Debug, Clone, Default)]
pub struct SourceSet {
    index: SourceIndex,
}

impl SourceSet {
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let index = SourceIndex::new(nets.into_iter().map(|net| (net, 0)))
            .expect("networks of a single owner always merge");
        SourceSet { index }
    }

    /// Returns whether any network of the set contains `address`.
    pub fn contains(&self, address: IpAddr) -> bool {
        self.index.lookup(address).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn lookup_finds_owner_of_containing_network() {
        let index = SourceIndex::new([
            (net("10.50.0.0/16"), 0),
            (net("192.168.1.0/24"), 1),
            (net("fd00::/8"), 2),
        ])
        .unwrap();
        assert_eq!(index.lookup(ip("10.50.3.4")), Some(0));
        assert_eq!(index.lookup(ip("10.50.255.255")), Some(0));
        assert_eq!(index.lookup(ip("10.51.0.0")), None);
        assert_eq!(index.lookup(ip("192.168.1.77")), Some(1));
        assert_eq!(index.lookup(ip("fd12::1")), Some(2));
        assert_eq!(index.lookup(ip("fe80::1")), None);
        assert_eq!(index.lookup(ip("0.0.0.0")), None);
    }

    #[test]
    fn lookup_treats_mapped_ipv4_as_ipv4() {
        let index = SourceIndex::new([(net("127.0.0.0/8"), 4)]).unwrap();
        assert_eq!(index.lookup(ip("::ffff:127.0.0.1")), Some(4));
    }

    #[test]
    fn overlapping_networks_of_two_owners_are_rejected() {
        let error =
            SourceIndex::new([(net("10.0.0.0/8"), 0), (net("10.50.0.0/16"), 1)]).unwrap_err();
        assert_eq!(error.first, (net("10.0.0.0/8"), 0));
        assert_eq!(error.second, (net("10.50.0.0/16"), 1));
        assert_eq!(
            error.to_string(),
            "10.50.0.0/16 of owner 1 overlaps 10.0.0.0/8 of owner 0"
        );
    }

    #[test]
    fn overlapping_networks_of_one_owner_merge() {
        let index = SourceIndex::new([
            (net("10.0.0.0/8"), 3),
            (net("10.50.0.0/16"), 3),
            (net("11.0.0.0/8"), 3),
        ])
        .unwrap();
        assert_eq!(index.lookup(ip("10.50.0.1")), Some(3));
        assert_eq!(index.lookup(ip("11.255.255.255")), Some(3));
        assert_eq!(index.lookup(ip("12.0.0.0")), None);
    }

    #[test]
    fn set_ignores_host_bits() {
        let set = SourceSet::new([net("10.1.2.3/24")]);
        assert!(set.contains(ip("10.1.2.200")));
        assert!(!set.contains(ip("10.1.3.0")));
    }
}
