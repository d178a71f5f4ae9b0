//! Host data written into a tensor's own device buffer on the GPU backends (wgpu: Metal,
//! Vulkan). Burn's tensors are values: every upload makes a new buffer. A captured training
//! step (`kiln_train::replay`) replays against the buffers it was captured with, so its next
//! micro-batch and learning rate must land in those very buffers. A Fusion custom operation
//! (an ordering point in the stream, like the other kernels of kiln's) does the write, on the
//! stream that later replays.
//!
//! The write is in place only when nothing else holds the buffer; otherwise the data goes to a
//! new buffer (still correct for an eager step) and [`misses`] counts it.

use burn::backend::fusion::custom::{
    CustomOpIr, HandleContainer, Operation, OperationIr, StreamId, TensorIr,
};
use burn::backend::fusion::{ExecutionError, FusionRuntime};
use burn::backend::ops::{FloatTensorOps, IntTensorOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Cube, DType, TensorData, TensorMetadata};
use burn_cubecl::CubeBackend;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

const OVERWRITE: &str = "kiln::overwrite";

/// Writes that could not be in place.
static MISSES: AtomicU64 = AtomicU64::new(0);

/// How many overwrites so far made a new buffer instead (a captured step needs none).
pub fn misses() -> u64 {
    MISSES.load(Ordering::Relaxed)
}

type Runtime = <CubeBackend as burn::backend::fusion::FusionBackend>::FusionRuntime;

#[derive(Debug)]
struct Overwrite {
    desc: CustomOpIr,
    /// Taken by the one execution.
    data: Mutex<Option<TensorData>>,
}

impl Operation<Runtime> for Overwrite {
    fn execute(
        &self,
        handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>,
    ) -> Result<(), ExecutionError> {
        let ([input], [output]) = self.desc.as_fixed();
        // Any type: the handle is read as bytes.
        let tensor = handles.get_float_tensor::<CubeBackend>(input);
        let data = self
            .data
            .lock()
            .map_err(|_| ExecutionError::WithContext {
                reason: "kiln::overwrite's data was poisoned".into(),
            })?
            .take()
            .ok_or_else(|| ExecutionError::WithContext {
                reason: "kiln::overwrite executed twice".into(),
            })?;
        // The buffer may be longer than the data (allocations are rounded up); the write
        // covers the tensor's own bytes, from the start.
        let fits = tensor.can_mut()
            && tensor.is_contiguous()
            && data.bytes().len() == tensor.shape().num_elements() * tensor.dtype.size()
            && data.bytes().len() as u64 <= tensor.handle.size();
        let written = if fits {
            let (bytes, _, _) = data.into_parts();
            tensor.client.write(&tensor.handle, bytes);
            tensor
        } else {
            MISSES.fetch_add(1, Ordering::Relaxed);
            let device = tensor.device.clone();
            match data.dtype() {
                DType::F64 | DType::F32 | DType::Flex32 | DType::F16 | DType::BF16 => {
                    <CubeBackend as FloatTensorOps<CubeBackend>>::float_from_data(data, &device)
                }
                _ => <CubeBackend as IntTensorOps<CubeBackend>>::int_from_data(data, &device),
            }
        };
        handles.register_float_tensor::<CubeBackend>(&output.id, written);
        Ok(())
    }
}

/// `FusedOps::kiln_overwrite` on the GPU backends (float and integer tensors alike).
pub fn overwrite(tensor: FloatTensor<Cube>, data: TensorData) -> FloatTensor<Cube> {
    let client = tensor.client.clone();
    let out = TensorIr::uninit(client.create_empty_handle(), tensor.shape(), tensor.dtype());
    let data = data.convert_dtype(tensor.dtype());
    let desc = CustomOpIr::new(OVERWRITE, &[tensor.into_ir()], &[out]);
    let op = Overwrite {
        desc: desc.clone(),
        data: Mutex::new(Some(data)),
    };
    client
        .register(StreamId::current(), OperationIr::Custom(desc), op)
        .into_iter()
        .next()
        .unwrap_or_else(|| unreachable!("kiln::overwrite is registered with one output"))
}
