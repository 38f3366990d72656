//! The OPC UA nodes of the Modbus tags: a `Tags` folder under Objects with
//! one Variable per tag in the namespace `urn:sluice:tags`, built from one
//! generation's `TagMap`. Also the mappings between tag values, qualities
//! and types and their OPC UA forms. Decisions are `tags`' business.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use opcua::nodes::{AccessLevel, ObjectBuilder, VariableBuilder};
use opcua::server::address_space::AddressSpace;
use opcua::types::{
    DataTypeId, EUInformation, ExtensionObject, LocalizedText, NodeId, ObjectId, QualifiedName,
    StatusCode, UAString, VariableTypeId, Variant,
};

use crate::config::{TagAccess, TagType};
use crate::policy::DevicePlan;
use crate::tags::{self, Quality, Tag, TagId, TagMap, TagValue, NAMESPACE_URI};

/// Numeric id of the `Tags` folder. Tag node ids are strings, so no tag
/// can take it.
const FOLDER_ID: u32 = 1;
/// Numeric id of the first EngineeringUnits property; tag `n` has
/// `FIRST_PROPERTY_ID + n`.
const FIRST_PROPERTY_ID: u32 = 1000;
/// The UNECE units namespace URI of OPC UA's EUInformation. A free-text
/// `unit` has no UNECE code, so `unitId` is -1.
const UNECE_NAMESPACE: &str = "http://www.opcfoundation.org/UA/units/un/cefact";

/// The nodes of one generation's tags in one server's tag namespace.
pub struct TagSpace {
    pub tags: Arc<TagMap>,
    pub space: AddressSpace,
    pub namespace: u16,
    /// The tag each EngineeringUnits property belongs to, by property id.
    properties: HashMap<u32, TagId>,
}

/// The kind of node a node id of the tag namespace names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagNode {
    Folder,
    Tag(TagId),
    /// The EngineeringUnits property of a tag.
    Property(TagId),
}

impl TagSpace {
    /// Builds the nodes of `tags` in namespace `namespace`; `devices`
    /// gives each tag's mirror block poll interval, its minimum sampling
    /// interval.
    pub fn build(tags: Arc<TagMap>, devices: &[DevicePlan], namespace: u16) -> TagSpace {
        let mut space = AddressSpace::new();
        space.add_namespace(NAMESPACE_URI, namespace);
        let folder = folder_id(namespace);
        ObjectBuilder::new(&folder, QualifiedName::new(namespace, "Tags"), "Tags")
            .is_folder()
            .organized_by(ObjectId::ObjectsFolder)
            .insert(&mut space);
        let mut properties = HashMap::new();
        for (id, tag) in tags.tags().iter().enumerate() {
            let node = NodeId::new(namespace, tag.name.to_string());
            let level = access_level(tag.access);
            let interval = block_poll(tag, devices).map_or(0.0, |poll| poll.as_secs_f64() * 1000.0);
            VariableBuilder::new(&node, QualifiedName::new(namespace, &*tag.name), &*tag.name)
                .data_type(data_type_id(tags::value_type(tag)))
                .value_rank(-1)
                .access_level(level)
                .user_access_level(level)
                .minimum_sampling_interval(interval)
                .has_type_definition(VariableTypeId::BaseDataVariableType)
                .organized_by(folder.clone())
                .insert(&mut space);
            let Some(unit) = &tag.engineering_unit else {
                continue;
            };
            let property_id = FIRST_PROPERTY_ID + id as u32;
            VariableBuilder::new(
                &NodeId::new(namespace, property_id),
                QualifiedName::new(0, "EngineeringUnits"),
                "EngineeringUnits",
            )
            .data_type(DataTypeId::EUInformation)
            .value_rank(-1)
            .access_level(AccessLevel::CURRENT_READ)
            .user_access_level(AccessLevel::CURRENT_READ)
            .value(engineering_units(unit))
            .has_type_definition(VariableTypeId::PropertyType)
            .property_of(node)
            .insert(&mut space);
            properties.insert(property_id, id);
        }
        TagSpace {
            tags,
            space,
            namespace,
            properties,
        }
    }

    /// Returns the kind of `node`, or `None` when the tag namespace has no such node.
    pub fn node(&self, node: &NodeId) -> Option<TagNode> {
        if node.namespace != self.namespace {
            return None;
        }
        match &node.identifier {
            opcua::types::Identifier::Numeric(FOLDER_ID) => Some(TagNode::Folder),
            opcua::types::Identifier::Numeric(number) => {
                self.properties.get(number).map(|id| TagNode::Property(*id))
            }
            opcua::types::Identifier::String(name) => {
                self.tags.find(name.as_ref()).map(TagNode::Tag)
            }
            _ => None,
        }
    }

    pub fn folder(&self) -> NodeId {
        folder_id(self.namespace)
    }
}

fn folder_id(namespace: u16) -> NodeId {
    NodeId::new(namespace, FOLDER_ID)
}

fn access_level(access: TagAccess) -> AccessLevel {
    match access {
        TagAccess::Read => AccessLevel::CURRENT_READ,
        TagAccess::ReadWrite => AccessLevel::CURRENT_READ | AccessLevel::CURRENT_WRITE,
    }
}

/// Returns the poll interval of the mirror block that contains `tag`.
pub fn block_poll(tag: &Tag, devices: &[DevicePlan]) -> Option<Duration> {
    let end = u32::from(tag.address) + u32::from(tag.count());
    devices
        .get(tag.device)?
        .mirror
        .iter()
        .find(|block| block.kind == tag.kind && block.start <= tag.address && end <= block.end())
        .map(|block| block.poll)
}

fn engineering_units(unit: &str) -> Variant {
    let information = EUInformation {
        namespace_uri: UAString::from(UNECE_NAMESPACE),
        unit_id: -1,
        display_name: LocalizedText::new("", unit),
        description: LocalizedText::new("", unit),
    };
    Variant::from(ExtensionObject::from_message(information))
}

/// Returns the OPC UA data type of the values of tags of type `value_type`.
pub fn data_type_id(value_type: TagType) -> DataTypeId {
    match value_type {
        TagType::Bool => DataTypeId::Boolean,
        TagType::Int16 => DataTypeId::Int16,
        TagType::UInt16 => DataTypeId::UInt16,
        TagType::Int32 => DataTypeId::Int32,
        TagType::UInt32 => DataTypeId::UInt32,
        TagType::Int64 => DataTypeId::Int64,
        TagType::UInt64 => DataTypeId::UInt64,
        TagType::Float32 => DataTypeId::Float,
        TagType::Float64 => DataTypeId::Double,
        TagType::String { .. } => DataTypeId::String,
    }
}

/// Returns the status code of a value of this quality.
pub fn quality_status(quality: Quality) -> StatusCode {
    match quality {
        Quality::Good => StatusCode::Good,
        Quality::UncertainLastUsableValue => StatusCode::UncertainLastUsableValue,
        Quality::BadCommunicationError => StatusCode::BadCommunicationError,
    }
}

pub fn to_variant(value: TagValue) -> Variant {
    match value {
        TagValue::Bool(v) => Variant::Boolean(v),
        TagValue::Int16(v) => Variant::Int16(v),
        TagValue::UInt16(v) => Variant::UInt16(v),
        TagValue::Int32(v) => Variant::Int32(v),
        TagValue::UInt32(v) => Variant::UInt32(v),
        TagValue::Int64(v) => Variant::Int64(v),
        TagValue::UInt64(v) => Variant::UInt64(v),
        TagValue::Float32(v) => Variant::Float(v),
        TagValue::Float64(v) => Variant::Double(v),
        TagValue::String(v) => Variant::String(UAString::from(v)),
    }
}

/// Returns the tag value a written variant stands for, when the variant has
/// exactly the type of the tag's values; `None` is a type mismatch.
pub fn from_variant(value_type: TagType, value: &Variant) -> Option<TagValue> {
    Some(match (value_type, value) {
        (TagType::Bool, Variant::Boolean(v)) => TagValue::Bool(*v),
        (TagType::Int16, Variant::Int16(v)) => TagValue::Int16(*v),
        (TagType::UInt16, Variant::UInt16(v)) => TagValue::UInt16(*v),
        (TagType::Int32, Variant::Int32(v)) => TagValue::Int32(*v),
        (TagType::UInt32, Variant::UInt32(v)) => TagValue::UInt32(*v),
        (TagType::Int64, Variant::Int64(v)) => TagValue::Int64(*v),
        (TagType::UInt64, Variant::UInt64(v)) => TagValue::UInt64(*v),
        (TagType::Float32, Variant::Float(v)) => TagValue::Float32(*v),
        (TagType::Float64, Variant::Double(v)) => TagValue::Float64(*v),
        (TagType::String { .. }, Variant::String(v)) => TagValue::String(v.as_ref().to_owned()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_types_follow_value_types() {
        let cases = [
            (TagType::Bool, DataTypeId::Boolean),
            (TagType::Int16, DataTypeId::Int16),
            (TagType::UInt16, DataTypeId::UInt16),
            (TagType::Int32, DataTypeId::Int32),
            (TagType::UInt32, DataTypeId::UInt32),
            (TagType::Int64, DataTypeId::Int64),
            (TagType::UInt64, DataTypeId::UInt64),
            (TagType::Float32, DataTypeId::Float),
            (TagType::Float64, DataTypeId::Double),
            (TagType::String { length: 8 }, DataTypeId::String),
        ];
        for (value_type, expected) in cases {
            assert_eq!(data_type_id(value_type), expected, "{value_type:?}");
        }
    }

    #[test]
    fn qualities_map_to_status_codes() {
        assert_eq!(quality_status(Quality::Good), StatusCode::Good);
        assert_eq!(
            quality_status(Quality::UncertainLastUsableValue),
            StatusCode::UncertainLastUsableValue
        );
        assert_eq!(
            quality_status(Quality::BadCommunicationError),
            StatusCode::BadCommunicationError
        );
    }

    #[test]
    fn variants_round_trip_each_value_type() {
        let cases = [
            (TagType::Bool, TagValue::Bool(true), Variant::Boolean(true)),
            (TagType::Int16, TagValue::Int16(-2), Variant::Int16(-2)),
            (
                TagType::UInt16,
                TagValue::UInt16(65535),
                Variant::UInt16(65535),
            ),
            (
                TagType::Int32,
                TagValue::Int32(-70000),
                Variant::Int32(-70000),
            ),
            (
                TagType::UInt32,
                TagValue::UInt32(70000),
                Variant::UInt32(70000),
            ),
            (
                TagType::Int64,
                TagValue::Int64(-1 << 40),
                Variant::Int64(-1 << 40),
            ),
            (
                TagType::UInt64,
                TagValue::UInt64(1 << 63),
                Variant::UInt64(1 << 63),
            ),
            (
                TagType::Float32,
                TagValue::Float32(1.5),
                Variant::Float(1.5),
            ),
            (
                TagType::Float64,
                TagValue::Float64(-0.25),
                Variant::Double(-0.25),
            ),
            (
                TagType::String { length: 4 },
                TagValue::String("AB".into()),
                Variant::String("AB".into()),
            ),
        ];
        for (value_type, value, variant) in cases {
            assert_eq!(to_variant(value.clone()), variant, "{value_type:?}");
            assert_eq!(
                from_variant(value_type, &variant),
                Some(value),
                "{value_type:?}"
            );
        }
    }

    #[test]
    fn variant_of_another_type_is_a_mismatch() {
        assert_eq!(from_variant(TagType::Float32, &Variant::Double(1.0)), None);
        assert_eq!(from_variant(TagType::Int16, &Variant::Int32(1)), None);
        assert_eq!(from_variant(TagType::Bool, &Variant::Byte(1)), None);
        assert_eq!(
            from_variant(TagType::String { length: 2 }, &Variant::Empty),
            None
        );
    }
}
