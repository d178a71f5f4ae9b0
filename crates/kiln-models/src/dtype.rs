//! Float types of tensors: half-precision compute casts on the way in and out of f32 islands.

use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

/// `t` as `dtype` (no operation when it already is).
pub fn to_dtype<const D: usize>(t: Tensor<D>, dtype: FloatDType) -> Tensor<D> {
    if FloatDType::from(t.dtype()) == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// The float type of `t`.
pub fn float_dtype<const D: usize>(t: &Tensor<D>) -> FloatDType {
    match t.dtype() {
        DType::BF16 => FloatDType::BF16,
        DType::F16 => FloatDType::F16,
        _ => FloatDType::F32,
    }
}
