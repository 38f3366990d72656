//! Conversion between Modbus registers or bits and typed tag values, with
//! register order, scale and offset. Pure functions: where the registers come
//! from and where a write goes is `tags`' business.

use crate::config::{RegisterOrder, TagType};

/// A tag value in the Rust type of its tag.
#[derive(Debug, Clone, PartialEq)]
pub enum TagValue {
    Bool(bool),
    Int16(i16),
    UInt16(u16),
    Int32(i32),
    UInt32(u32),
    Int64(i64),
    UInt64(u64),
    Float32(f32),
    Float64(f64),
    String(String),
}

impl TagValue {
    /// Returns the value as a float, for scaling; `None` for a bool or a
    /// string.
    fn as_f64(&self) -> Option<f64> {
        Some(match *self {
            TagValue::Int16(v) => f64::from(v),
            TagValue::UInt16(v) => f64::from(v),
            TagValue::Int32(v) => f64::from(v),
            TagValue::UInt32(v) => f64::from(v),
            TagValue::Int64(v) => v as f64,
            TagValue::UInt64(v) => v as f64,
            TagValue::Float32(v) => f64::from(v),
            TagValue::Float64(v) => v,
            TagValue::Bool(_) | TagValue::String(_) => return None,
        })
    }

    /// Returns an integer value exactly; `None` for other variants.
    fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            TagValue::Int16(v) => v.into(),
            TagValue::UInt16(v) => v.into(),
            TagValue::Int32(v) => v.into(),
            TagValue::UInt32(v) => v.into(),
            TagValue::Int64(v) => v.into(),
            TagValue::UInt64(v) => v.into(),
            _ => return None,
        })
    }

    /// Returns the name of the variant's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            TagValue::Bool(_) => "bool",
            TagValue::Int16(_) => "int16",
            TagValue::UInt16(_) => "uint16",
            TagValue::Int32(_) => "int32",
            TagValue::UInt32(_) => "uint32",
            TagValue::Int64(_) => "int64",
            TagValue::UInt64(_) => "uint64",
            TagValue::Float32(_) => "float32",
            TagValue::Float64(_) => "float64",
            TagValue::String(_) => "string",
        }
    }
}

/// The layout of one tag's value in its registers or bit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Encoding {
    pub data_type: TagType,
    pub order: RegisterOrder,
    /// The bit of a `bool` on a register, 0 being the least significant.
    pub bit: Option<u8>,
    pub scale: f64,
    pub offset: f64,
}

/// Failure to encode a value for a tag.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("a {expected} tag cannot take a {actual} value")]
    WrongType {
        expected: &'static str,
        actual: &'static str,
    },
    #[error("value {value} is not a finite number")]
    NotFinite { value: f64 },
    #[error("value {value} gives raw value {raw}, outside the {data_type} range {min}..={max}")]
    OutOfRange {
        value: String,
        raw: String,
        data_type: &'static str,
        min: String,
        max: String,
    },
    #[error("string of {length} characters is longer than the tag's {max}")]
    TooLong { length: usize, max: u16 },
    #[error(
        "character {character:?} is invalid; a string tag holds ASCII characters other than NUL"
    )]
    InvalidCharacter { character: char },
}

impl Encoding {
    /// Returns true when scale and offset leave raw values unchanged.
    pub fn is_identity(&self) -> bool {
        self.scale == 1.0 && self.offset == 0.0
    }

    /// Returns the variant of `TagValue` that `decode` returns: the type's
    /// own, except that a scaled integer type gives `Float64`, because its
    /// engineering values have fractions.
    pub fn value_type(&self) -> TagType {
        let integer = matches!(
            self.data_type,
            TagType::Int16
                | TagType::UInt16
                | TagType::Int32
                | TagType::UInt32
                | TagType::Int64
                | TagType::UInt64
        );
        if integer && !self.is_identity() {
            TagType::Float64
        } else {
            self.data_type
        }
    }

    /// Decodes the engineering value from `words`: one entry per register,
    /// or 0 and 1 for a bit, `data_type.register_count()` of them.
    pub fn decode(&self, words: &[u16]) -> TagValue {
        debug_assert_eq!(words.len(), usize::from(self.data_type.register_count()));
        let bytes = self.value_bytes(words);
        let raw = match self.data_type {
            TagType::Bool => {
                let bit = self.bit.unwrap_or(0);
                return TagValue::Bool(words[0] >> bit & 1 != 0);
            }
            TagType::String { .. } => return TagValue::String(decode_ascii(&bytes)),
            TagType::Int16 => TagValue::Int16(i16::from_be_bytes(array(&bytes))),
            TagType::UInt16 => TagValue::UInt16(u16::from_be_bytes(array(&bytes))),
            TagType::Int32 => TagValue::Int32(i32::from_be_bytes(array(&bytes))),
            TagType::UInt32 => TagValue::UInt32(u32::from_be_bytes(array(&bytes))),
            TagType::Int64 => TagValue::Int64(i64::from_be_bytes(array(&bytes))),
            TagType::UInt64 => TagValue::UInt64(u64::from_be_bytes(array(&bytes))),
            TagType::Float32 => TagValue::Float32(f32::from_be_bytes(array(&bytes))),
            TagType::Float64 => TagValue::Float64(f64::from_be_bytes(array(&bytes))),
        };
        if self.is_identity() {
            return raw;
        }
        let scaled = raw.as_f64().unwrap_or(0.0) * self.scale + self.offset;
        match raw {
            TagValue::Float32(_) => TagValue::Float32(scaled as f32),
            _ => TagValue::Float64(scaled),
        }
    }

    /// Encodes an engineering value into the registers that contain it, or
    /// into 0 or 1 for a `bool`, also one on a register bit. Inverts scale and offset and rounds to the nearest
    /// integer for integer types, halves away from zero.
    pub fn encode(&self, value: &TagValue) -> Result<Vec<u16>, EncodeError> {
        let bytes = match self.data_type {
            TagType::Bool => match value {
                TagValue::Bool(bit) => return Ok(vec![u16::from(*bit)]),
                other => return Err(self.wrong_type(other)),
            },
            TagType::String { length } => match value {
                TagValue::String(text) => encode_ascii(text, length)?,
                other => return Err(self.wrong_type(other)),
            },
            TagType::Float32 => {
                let raw = self.raw_float(value)?;
                let narrow = raw as f32;
                if narrow.is_infinite() {
                    return Err(self.out_of_range(value, raw));
                }
                narrow.to_be_bytes().to_vec()
            }
            TagType::Float64 => self.raw_float(value)?.to_be_bytes().to_vec(),
            integer => self.raw_integer(integer, value)?,
        };
        Ok(self.register_words(&bytes))
    }

    fn wrong_type(&self, value: &TagValue) -> EncodeError {
        EncodeError::WrongType {
            expected: self.data_type.name(),
            actual: value.type_name(),
        }
    }

    /// Returns the raw float that `value` stands for, checked to be finite.
    fn raw_float(&self, value: &TagValue) -> Result<f64, EncodeError> {
        let number = value.as_f64().ok_or_else(|| self.wrong_type(value))?;
        if !number.is_finite() {
            return Err(EncodeError::NotFinite { value: number });
        }
        let raw = (number - self.offset) / self.scale;
        if !raw.is_finite() {
            return Err(self.out_of_range(value, raw));
        }
        Ok(raw)
    }

    /// Returns the big-endian bytes of the raw integer that `value` stands
    /// for. Unscaled integer values convert exactly, without a float.
    fn raw_integer(&self, data_type: TagType, value: &TagValue) -> Result<Vec<u8>, EncodeError> {
        let (min, max) = integer_range(data_type);
        let raw = match value.as_i128() {
            Some(exact) if self.is_identity() => exact,
            _ => {
                let raw = self.raw_float(value)?.round();
                // Anything outside ±2^64 fails the range check below, and
                // inside it the conversion to i128 is exact.
                if raw.abs() >= 18_446_744_073_709_551_616.0 {
                    return Err(self.out_of_range(value, raw));
                }
                raw as i128
            }
        };
        if raw < min || raw > max {
            return Err(EncodeError::OutOfRange {
                value: display(value),
                raw: raw.to_string(),
                data_type: data_type.name(),
                min: min.to_string(),
                max: max.to_string(),
            });
        }
        let bytes = raw.to_be_bytes();
        let width = 2 * usize::from(data_type.register_count());
        Ok(bytes[16 - width..].to_vec())
    }

    fn out_of_range(&self, value: &TagValue, raw: f64) -> EncodeError {
        let (min, max) = match self.data_type {
            TagType::Float32 => (f32::MIN.to_string(), f32::MAX.to_string()),
            TagType::Float64 => (f64::MIN.to_string(), f64::MAX.to_string()),
            integer => {
                let (min, max) = integer_range(integer);
                (min.to_string(), max.to_string())
            }
        };
        EncodeError::OutOfRange {
            value: display(value),
            raw: raw.to_string(),
            data_type: self.data_type.name(),
            min,
            max,
        }
    }

    /// Puts the register bytes in big-endian value order: registers most
    /// significant first, each high byte first.
    fn value_bytes(&self, words: &[u16]) -> Vec<u8> {
        let mut ordered: Vec<u16> = words.to_vec();
        if self.order.swaps_registers() {
            ordered.reverse();
        }
        ordered
            .iter()
            .flat_map(|word| {
                let word = if self.order.swaps_bytes() {
                    word.swap_bytes()
                } else {
                    *word
                };
                word.to_be_bytes()
            })
            .collect()
    }

    /// Inverts `value_bytes`; `bytes` has an even length.
    fn register_words(&self, bytes: &[u8]) -> Vec<u16> {
        let mut words: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|pair| {
                let word = u16::from_be_bytes([pair[0], pair[1]]);
                if self.order.swaps_bytes() {
                    word.swap_bytes()
                } else {
                    word
                }
            })
            .collect();
        if self.order.swaps_registers() {
            words.reverse();
        }
        words
    }
}

fn integer_range(data_type: TagType) -> (i128, i128) {
    match data_type {
        TagType::Int16 => (i16::MIN.into(), i16::MAX.into()),
        TagType::UInt16 => (0, u16::MAX.into()),
        TagType::Int32 => (i32::MIN.into(), i32::MAX.into()),
        TagType::UInt32 => (0, u32::MAX.into()),
        TagType::Int64 => (i64::MIN.into(), i64::MAX.into()),
        _ => (0, u64::MAX.into()),
    }
}

fn display(value: &TagValue) -> String {
    match value {
        TagValue::Bool(v) => v.to_string(),
        TagValue::Int16(v) => v.to_string(),
        TagValue::UInt16(v) => v.to_string(),
        TagValue::Int32(v) => v.to_string(),
        TagValue::UInt32(v) => v.to_string(),
        TagValue::Int64(v) => v.to_string(),
        TagValue::UInt64(v) => v.to_string(),
        TagValue::Float32(v) => v.to_string(),
        TagValue::Float64(v) => v.to_string(),
        TagValue::String(v) => format!("{v:?}"),
    }
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

/// Reads text up to the first NUL byte. A byte outside ASCII becomes
/// U+FFFD, so that a device's garbage never reaches a client as other text.
fn decode_ascii(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take_while(|byte| **byte != 0)
        .map(|byte| {
            if byte.is_ascii() {
                char::from(*byte)
            } else {
                char::REPLACEMENT_CHARACTER
            }
        })
        .collect()
}

/// Returns `text` padded with NUL bytes to the tag's whole registers.
fn encode_ascii(text: &str, length: u16) -> Result<Vec<u8>, EncodeError> {
    if let Some(character) = text.chars().find(|c| !c.is_ascii() || *c == '\0') {
        return Err(EncodeError::InvalidCharacter { character });
    }
    if text.len() > usize::from(length) {
        return Err(EncodeError::TooLong {
            length: text.len(),
            max: length,
        });
    }
    let mut bytes = text.as_bytes().to_vec();
    bytes.resize(2 * usize::from(length.div_ceil(2)), 0);
    Ok(bytes)
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
