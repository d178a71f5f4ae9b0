//! Every float of the schema is read through these: NaN and infinities are refused where the
//! value is read, with the file's line and column, so no later check of the form `x < 0.0`
//! (false for NaN) can let one through. `tests::every_float_field_refuses_nan` finds a float
//! field that forgets them.

use serde::{Deserialize, Deserializer, de::Error};

fn check<E: Error>(x: f64) -> Result<f64, E> {
    if x.is_finite() {
        Ok(x)
    } else {
        Err(E::custom(format!("{x} is not a finite number")))
    }
}

/// A finite `f64`.
pub(crate) fn finite<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    check(f64::deserialize(d)?)
}

/// `null` or a finite `f64`.
pub(crate) fn finite_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Option::<f64>::deserialize(d)?.map(check).transpose()
}

/// A pair of finite `f64`s.
pub(crate) fn finite_pair<'de, D: Deserializer<'de>>(d: D) -> Result<[f64; 2], D::Error> {
    let [a, b] = <[f64; 2]>::deserialize(d)?;
    Ok([check(a)?, check(b)?])
}
