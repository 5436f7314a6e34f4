//! Moving host data onto a device and back.

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};

use crate::{Matrix, ModelError};

/// A host matrix as a `[rows, cols]` tensor.
pub fn matrix_to_tensor(m: &Matrix, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(m.data.clone(), [m.rows, m.cols]), device)
}

/// A host vector as a `[n]` tensor.
pub fn vector_to_tensor(v: &[f32], device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}

/// A tensor's elements as f32, row-major; fails if the device cannot be read.
pub fn tensor_to_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, ModelError> {
    t.try_into_vec_as::<f32>()
        .map_err(|e| ModelError::Backend(format!("reading a tensor back: {e:?}")))
}

pub(crate) fn param1(v: &[f32], device: &Device) -> Param<Tensor<1>> {
    Param::from_tensor(vector_to_tensor(v, device))
}
