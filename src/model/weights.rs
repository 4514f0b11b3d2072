//! safetensors ↔ modules by parameter path. A module's field path (`blocks.0.attn.qkv.weight`)
//! is its tensor name, so the seed's PyTorch files and Hugging Face's CLIP files load without a
//! name table. PyTorch stores a Linear weight as `[out, in]`, burn as `[in, out]`: those are
//! transposed on the way in and out.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};

/// The raw bytes of a safetensors file and where they came from (for messages).
pub struct SafetensorsFile {
    pub name: String,
    bytes: Vec<u8>,
}

impl SafetensorsFile {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path.display().to_string(), bytes)
    }

    pub fn from_bytes(name: String, bytes: Vec<u8>) -> Result<Self> {
        SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors {
            file: name.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self { name, bytes })
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated when read")
    }

    pub fn names(&self) -> Vec<String> {
        self.tensors()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// A tensor as f32 `TensorData` (F16 and BF16 are widened).
    pub fn tensor(&self, name: &str) -> Result<TensorData> {
        let tensors = self.tensors();
        let view = tensors.tensor(name).map_err(|_| Error::MissingTensor {
            file: self.name.clone(),
            name: name.to_string(),
            hint: String::new(),
        })?;
        view_to_data(&self.name, name, &view)
    }

    /// Used to find a module's prefix: a full `CLIPModel` file stores the text tower under
    /// `text_model.`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors().tensor(name).is_ok()
    }
}

fn view_to_data(file: &str, name: &str, view: &TensorView<'_>) -> Result<TensorData> {
    let shape = view.shape().to_vec();
    let dtype = match view.dtype() {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::I64 => DType::I64,
        StDtype::U8 => DType::U8,
        StDtype::BOOL => DType::Bool(burn::tensor::BoolStore::Native),
        other => {
            return Err(Error::TensorDtype {
                file: file.to_string(),
                name: name.to_string(),
                found: format!("{other:?}"),
            })
        }
    };
    let data = TensorData::from_bytes_vec(view.data().to_vec(), shape, dtype);
    Ok(match dtype {
        DType::F16 | DType::BF16 => data.convert::<f32>(),
        _ => data,
    })
}

/// Replaces every parameter of `module` with the tensor named by its path (after `prefix`).
/// All missing and mis-shaped tensors are reported together, so one run names every problem.
pub fn load_module<B: Backend, M: Module<B>>(
    module: M,
    file: &SafetensorsFile,
    prefix: &str,
) -> Result<M> {
    let mut loader = Loader::<B> {
        file,
        prefix,
        path: ModulePath::default(),
        problems: Vec::new(),
        _backend: std::marker::PhantomData,
    };
    let module = module.map(&mut loader);
    let mut problems = loader.problems;
    match problems.len() {
        0 => Ok(module),
        1 => Err(problems.remove(0)),
        count => Err(Error::Safetensors {
            file: file.name.clone(),
            reason: format!(
                "{count} tensors do not fit the model: {}",
                problems
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }),
    }
}

/// Where a visitor or mapper is in the module tree: field names and their container types.
#[derive(Default)]
struct ModulePath(Vec<(String, String)>);

impl ModulePath {
    fn enter(&mut self, name: &str, container_type: &str) {
        self.0.push((name.to_string(), container_type.to_string()));
    }

    fn exit(&mut self) {
        self.0.pop();
    }

    fn dotted(&self) -> String {
        self.0
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(".")
    }

    fn is_linear_weight(&self) -> bool {
        self.0
            .last()
            .is_some_and(|(name, container)| name == "weight" && container == "Struct:Linear")
    }
}

struct Loader<'a, B: Backend> {
    file: &'a SafetensorsFile,
    prefix: &'a str,
    path: ModulePath,
    problems: Vec<Error>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: Backend> ModuleMapper<B> for Loader<'_, B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, current, mapper) = param.consume();
        let name = format!("{}{}", self.prefix, self.path.dotted());
        let transpose = D == 2 && self.path.is_linear_weight();
        let expected: Vec<usize> = {
            let dims = current.dims().to_vec();
            if transpose {
                vec![dims[1], dims[0]]
            } else {
                dims
            }
        };
        let loaded = self.file.tensor(&name).and_then(|data| {
            if data.shape.as_slice() != expected.as_slice() {
                return Err(Error::TensorShape {
                    file: self.file.name.clone(),
                    name: name.clone(),
                    expected: expected.clone(),
                    found: data.shape.to_vec(),
                });
            }
            let tensor = Tensor::<B, D>::from_data(data.convert::<f32>(), &current.device());
            let tensor = if transpose {
                tensor.transpose()
            } else {
                tensor
            };
            // A tensor made from data is not tracked by autodiff: keep the parameter trainable
            // if it was, or a resumed run would silently stop updating it.
            Ok(if current.is_require_grad() {
                tensor.require_grad()
            } else {
                tensor
            })
        });
        match loaded {
            Ok(tensor) => Param::from_mapped_value(id, tensor, mapper),
            Err(problem) => {
                self.problems.push(problem);
                Param::from_mapped_value(id, current, mapper)
            }
        }
    }
}

/// Every parameter of `module` by path, in PyTorch layout, as f32 `TensorData`.
pub fn named_tensors<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, TensorData> {
    let mut collector = Collector::<B> {
        path: ModulePath::default(),
        tensors: BTreeMap::new(),
        _backend: std::marker::PhantomData,
    };
    module.visit(&mut collector);
    collector.tensors
}

struct Collector<B: Backend> {
    path: ModulePath,
    tensors: BTreeMap<String, TensorData>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: Backend> ModuleVisitor<B> for Collector<B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        let tensor = if D == 2 && self.path.is_linear_weight() {
            tensor.transpose()
        } else {
            tensor
        };
        let data = tensor.into_data().convert::<f32>();
        self.tensors.insert(self.path.dotted(), data);
    }
}

/// Serialises `module`'s parameters (PyTorch names and layout) to safetensors bytes, so files
/// written by ditrun open in PyTorch and load back with [`load_module`].
pub fn module_to_safetensors<B: Backend, M: Module<B>>(module: &M) -> Result<Vec<u8>> {
    let tensors = named_tensors::<B, M>(module);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, data)| {
            let view = TensorView::new(StDtype::F32, data.shape.to_vec(), data.as_bytes())
                .expect("f32 data matches its shape");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize(views, None).map_err(|e| Error::Safetensors {
        file: "<in memory>".into(),
        reason: e.to_string(),
    })
}

/// Draws every lazily initialised parameter now. burn's initialisers defer the random draw to
/// a parameter's first use, which would put it outside [`crate::backend::seeded`]'s guard and
/// make a seeded model depend on whatever else drew from the generator in the meantime.
pub fn materialize<B: Backend, M: Module<B>>(module: M) -> M {
    struct Touch;
    impl<B: Backend> ModuleMapper<B> for Touch {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            Param::from_mapped_value(id, tensor, mapper)
        }
    }
    module.map(&mut Touch)
}
