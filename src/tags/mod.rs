//! Tags: named, typed values over devices' mirror blocks, independent of
//! the protocol that exposes them. A generation contains one `TagMap`, built
//! from the `[[tag]]` sections. Reads decode the mirror's latest poll, and
//! a write becomes the Modbus request that the caller decides and forwards
//! like any other.

mod codec;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::config::{StateKind, TagAccess, TagConfig, TagType};
use crate::mirror::{MirrorStore, Reachability};
use crate::modbus::pdu::Request;
use crate::policy::{DeviceId, DevicePlan};

pub use codec::{EncodeError, Encoding, TagValue};

/// The namespace URI of every tag node.
pub const NAMESPACE_URI: &str = crate::config::TAG_NAMESPACE_URI;

/// Index of a tag in its `TagMap`, in configuration order.
pub type TagId = usize;

/// One compiled tag.
#[derive(Debug, Clone, PartialEq)]
pub struct Tag {
    /// Browse name and string node id.
    pub name: Arc<str>,
    pub device: DeviceId,
    pub device_name: Arc<str>,
    /// Modbus unit id a write is sent with: the device's `unit`.
    pub unit_id: u8,
    pub kind: StateKind,
    pub address: u16,
    pub encoding: Encoding,
    /// Engineering unit, such as `°C`.
    pub engineering_unit: Option<Arc<str>>,
    pub access: TagAccess,
}

impl Tag {
    /// Returns the number of registers or bits the tag covers.
    pub fn count(&self) -> u16 {
        self.encoding.data_type.register_count()
    }

    /// Returns the OPC UA node id, `nsu=urn:sluice:tags;s=NAME`.
    pub fn node_id(&self) -> String {
        format!("nsu={NAMESPACE_URI};s={}", self.name)
    }
}

/// How far a tag's value can be trusted, in OPC UA terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    /// Every register of the tag was read by its latest poll, less than the
    /// block's `max_age_ms` ago, and the device responded to its latest poll.
    Good,
    /// The device responded to its latest poll, but the tag's registers are
    /// older than the block's `max_age_ms` or their latest poll failed, as
    /// with an exception response: the value is the last one read.
    UncertainLastUsableValue,
    /// The device did not respond to its latest mirror poll, or the tag's
    /// registers were never read. The value, if any, is the last one read.
    BadCommunicationError,
}

/// A tag's value as the mirror stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct TagReading {
    /// `None` only when the registers were never read.
    pub value: Option<TagValue>,
    pub quality: Quality,
    /// When the device was polled for the oldest of the tag's registers.
    pub source_time: Option<jiff::Timestamp>,
}

/// A Modbus request that writes a tag, and where it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct TagWrite {
    pub device: DeviceId,
    pub unit_id: u8,
    pub request: Request,
}

/// Failure to turn a tag write into a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TagWriteError {
    #[error("tag \"{0}\" is read-only")]
    ReadOnly(Arc<str>),
    #[error("tag \"{tag}\": {source}")]
    Value {
        tag: Arc<str>,
        #[source]
        source: Box<EncodeError>,
    },
}

/// The tags of one generation, in configuration order.
#[derive(Debug, Default)]
pub struct TagMap {
    tags: Vec<Tag>,
    by_name: HashMap<Arc<str>, TagId>,
}

impl TagMap {
    /// Compiles the checked tag sections against the policy's devices. A
    /// tag whose device is not in `devices` is left out; validation already
    /// rejected such a configuration.
    pub fn build(configs: &[TagConfig], devices: &[DevicePlan]) -> TagMap {
        let mut map = TagMap::default();
        for config in configs {
            let Some(device) = devices.iter().position(|plan| *plan.name == config.device) else {
                continue;
            };
            let tag = Tag {
                name: Arc::from(config.name.as_str()),
                device,
                device_name: devices[device].name.clone(),
                unit_id: devices[device].unit,
                kind: config.kind,
                address: config.address,
                encoding: Encoding {
                    data_type: config.data_type,
                    order: config.order,
                    bit: config.bit,
                    scale: config.scale,
                    offset: config.offset,
                },
                engineering_unit: config.unit.as_deref().map(Arc::from),
                access: config.access,
            };
            map.by_name.insert(tag.name.clone(), map.tags.len());
            map.tags.push(tag);
        }
        map
    }

    /// Lists every tag in configuration order; a tag's position is its id.
    pub fn tags(&self) -> &[Tag] {
        &self.tags
    }

    pub fn get(&self, id: TagId) -> Option<&Tag> {
        self.tags.get(id)
    }

    /// Returns the id of the tag named `name`.
    pub fn find(&self, name: &str) -> Option<TagId> {
        self.by_name.get(name).copied()
    }

    /// Reads tag `id` from `mirror` as of `now`; `None` for an unknown id.
    pub fn read(&self, id: TagId, mirror: &MirrorStore, now: Instant) -> Option<TagReading> {
        let tag = self.tags.get(id)?;
        Some(read_tag(tag, mirror, now))
    }

    /// Builds the request that writes `value` to tag `id`; `None` for an
    /// unknown id.
    pub fn write(&self, id: TagId, value: &TagValue) -> Option<Result<TagWrite, TagWriteError>> {
        let tag = self.tags.get(id)?;
        Some(write_tag(tag, value))
    }
}

/// Reads `tag` from the mirror; see `Quality` for how quality is chosen.
pub fn read_tag(tag: &Tag, mirror: &MirrorStore, now: Instant) -> TagReading {
    let snapshot = mirror
        .device(tag.device)
        .and_then(|device| device.snapshot(tag.kind, tag.address, tag.count(), now));
    let Some(snapshot) = snapshot else {
        return TagReading {
            value: None,
            quality: Quality::BadCommunicationError,
            source_time: None,
        };
    };
    let quality = match (snapshot.reachable, snapshot.fresh) {
        (Reachability::Unreachable, _) => Quality::BadCommunicationError,
        (_, true) => Quality::Good,
        (_, false) => Quality::UncertainLastUsableValue,
    };
    TagReading {
        value: Some(tag.encoding.decode(&snapshot.values)),
        quality,
        source_time: Some(snapshot.polled_time),
    }
}

/// Turns a write of `value` to `tag` into the Modbus request for the
/// tag's device and unit: as `write_request` builds it, or FC 22 for a bit
/// of a register. The caller decides the request with the vendor's
/// Modbus rules and sends it through the device's upstream pool.
pub fn write_tag(tag: &Tag, value: &TagValue) -> Result<TagWrite, TagWriteError> {
    if tag.access != TagAccess::ReadWrite {
        return Err(TagWriteError::ReadOnly(tag.name.clone()));
    }
    let words = tag
        .encoding
        .encode(value)
        .map_err(|source| TagWriteError::Value {
            tag: tag.name.clone(),
            source: Box::new(source),
        })?;
    let request = match tag.encoding.bit {
        Some(bit) => write_bit_request(tag.address, bit, words[0] != 0),
        None => write_request(tag.kind, tag.address, &words),
    };
    Ok(TagWrite {
        device: tag.device,
        unit_id: tag.unit_id,
        request,
    })
}

/// Builds the write of `values` from `address`: FC 6 for one holding
/// register, FC 16 for more, FC 5 for one coil and FC 15 for more. A bit
/// value is on when non-zero. `kind` must be writable, a holding register or
/// a coil, and `values` must hold 1 to 123 registers or 1 to 1968 coils.
pub fn write_request(kind: StateKind, address: u16, values: &[u16]) -> Request {
    debug_assert!(matches!(kind, StateKind::HoldingRegister | StateKind::Coil));
    let quantity = values.len() as u16;
    match (kind, values) {
        (StateKind::Coil | StateKind::DiscreteInput, [value]) => Request::WriteSingleCoil {
            address,
            value: *value != 0,
        },
        (StateKind::Coil | StateKind::DiscreteInput, _) => {
            let mut packed = vec![0u8; values.len().div_ceil(8)];
            for (index, value) in values.iter().enumerate() {
                if *value != 0 {
                    packed[index / 8] |= 1 << (index % 8);
                }
            }
            Request::WriteMultipleCoils {
                address,
                quantity,
                values: Bytes::from(packed),
            }
        }
        (_, [value]) => Request::WriteSingleRegister {
            address,
            value: *value,
        },
        _ => Request::WriteMultipleRegisters {
            address,
            quantity,
            values: values
                .iter()
                .flat_map(|value| value.to_be_bytes())
                .collect(),
        },
    }
}

/// Builds the FC 22 request that sets or clears bit `bit` of holding
/// register `address` and leaves its other bits as the device has them.
pub fn write_bit_request(address: u16, bit: u8, value: bool) -> Request {
    let mask = 1u16 << bit;
    Request::MaskWriteRegister {
        address,
        and_mask: !mask,
        or_mask: if value { mask } else { 0 },
    }
}

/// Returns the type of the values a tag's reads return, for the OPC UA
/// data type of its node.
pub fn value_type(tag: &Tag) -> TagType {
    tag.encoding.value_type()
}

#[cfg(test)]
mod tests;
