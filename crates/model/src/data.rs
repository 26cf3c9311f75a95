use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use crate::error::ModelError;
use crate::spec::NUM_CLASSES;

/// Environment variable that names the data directory when no flag does.
pub const DATA_DIR_ENV: &str = "FEDCOMPRESS_DATA";

/// Install directory of the Debian/Ubuntu package `dataset-fashion-mnist`.
pub const SYSTEM_DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Directory of the Fashion-MNIST subset in the repository, relative to its root.
const SUBSET_DIR: &str = "data/fashion-mnist-subset";

const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

/// Mean and standard deviation of the Fashion-MNIST training pixels scaled to [0, 1]. Inputs
/// are standardized with them so that the first layer gets values centred on zero with unit
/// spread, which lets the default initialization and learning rates work as they do in PyTorch.
const PIXEL_MEAN: f32 = 0.2860;
const PIXEL_STD: f32 = 0.3530;

/// Grayscale images with one class label each, as stored in IDX files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    /// Pixels of all images, row-major, `rows * cols` bytes per image.
    pub images: Vec<u8>,
    /// Class of each image, in `0..10`.
    pub labels: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of pixels of one image.
    pub fn pixels_per_image(&self) -> usize {
        self.rows * self.cols
    }

    /// Pixels of sample `index`.
    ///
    /// # Panics
    ///
    /// Panics if `index >= self.len()`.
    pub fn image(&self, index: usize) -> &[u8] {
        let size = self.pixels_per_image();
        &self.images[index * size..(index + 1) * size]
    }

    /// Copies the samples at `indices`, in that order.
    ///
    /// # Panics
    ///
    /// Panics if an index is `>= self.len()`.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(indices.len() * self.pixels_per_image());
        let mut labels = Vec::with_capacity(indices.len());
        for &index in indices {
            images.extend_from_slice(self.image(index));
            labels.push(self.labels[index]);
        }
        Dataset {
            images,
            labels,
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// Standardized pixels of the samples at `indices`, one image after the other.
    pub(crate) fn standardized_pixels(&self, indices: &[usize]) -> Vec<f32> {
        let table = standardized_pixel_table();
        let mut pixels = Vec::with_capacity(indices.len() * self.pixels_per_image());
        for &index in indices {
            pixels.extend(self.image(index).iter().map(|&p| table[usize::from(p)]));
        }
        pixels
    }

    /// Labels of the samples at `indices` as class indices.
    pub(crate) fn label_indices(&self, indices: &[usize]) -> Vec<i64> {
        indices
            .iter()
            .map(|&index| i64::from(self.labels[index]))
            .collect()
    }
}

/// Standardized value of each of the 256 pixel values.
fn standardized_pixel_table() -> [f32; 256] {
    let mut table = [0f32; 256];
    for (value, entry) in table.iter_mut().enumerate() {
        *entry = (value as f32 / 255.0 - PIXEL_MEAN) / PIXEL_STD;
    }
    table
}

/// Rule that chose the data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataOrigin {
    /// The `--data-dir` flag.
    Flag,
    /// The environment variable `FEDCOMPRESS_DATA`.
    Env,
    /// The system package at `/usr/share/datasets/fashion-mnist`.
    System,
    /// The subset in the repository's `data/fashion-mnist-subset`.
    Subset,
}

impl fmt::Display for DataOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataOrigin::Flag => "from --data-dir",
            DataOrigin::Env => "from FEDCOMPRESS_DATA",
            DataOrigin::System => "system package dataset-fashion-mnist",
            DataOrigin::Subset => "subset shipped in the repository",
        })
    }
}

/// Data directory in use, with a one-line description for logs and reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSource {
    pub dir: PathBuf,
    /// For example "Fashion-MNIST at /usr/share/datasets/fashion-mnist (60000 train, 10000 test)".
    pub description: String,
    pub origin: DataOrigin,
}

/// Chooses the data directory: the flag, then `FEDCOMPRESS_DATA`, then the system package
/// directory, then the Fashion-MNIST subset in the repository.
///
/// A directory given by the flag or the environment must exist. The system and subset
/// directories are used only if they contain the training images.
pub fn resolve_data_dir(flag: Option<&Path>) -> Result<PathBuf, ModelError> {
    resolve_data_origin(flag).map(|(dir, _)| dir)
}

/// Like [`resolve_data_dir`], and also returns how the directory was chosen.
pub fn resolve_data_origin(flag: Option<&Path>) -> Result<(PathBuf, DataOrigin), ModelError> {
    locate_data_dir(
        flag,
        std::env::var_os(DATA_DIR_ENV),
        Path::new(SYSTEM_DATA_DIR),
        &subset_dir_candidates(),
    )
}

/// Resolves the data directory as [`resolve_data_dir`] does and loads the training and test sets.
pub fn load_data(flag: Option<&Path>) -> Result<(DataSource, Dataset, Dataset), ModelError> {
    let (dir, origin) = resolve_data_origin(flag)?;
    let (train, test) = load_dataset(&dir)?;
    let counts = format!("{} train, {} test", train.len(), test.len());
    let description = match origin {
        DataOrigin::Flag | DataOrigin::Env => {
            format!("IDX data at {} {origin} ({counts})", dir.display())
        }
        DataOrigin::System => format!("Fashion-MNIST at {} ({counts})", dir.display()),
        DataOrigin::Subset => format!("Fashion-MNIST subset at {} ({counts})", dir.display()),
    };
    tracing::debug!(dir = %dir.display(), %origin, train = train.len(), test = test.len(), "loaded data");
    Ok((
        DataSource {
            dir,
            description,
            origin,
        },
        train,
        test,
    ))
}

/// Returns the Fashion-MNIST subset directory of the repository if it can be found, next to
/// the sources this crate was built from or above the running executable.
pub fn subset_data_dir() -> Option<PathBuf> {
    subset_dir_candidates()
        .into_iter()
        .find(|dir| has_train_images(dir))
}

fn subset_dir_candidates() -> Vec<PathBuf> {
    let mut candidates = vec![
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(SUBSET_DIR),
    ];
    // A binary under target/<profile>/ or target/<profile>/examples/ of a moved checkout.
    if let Ok(exe) = std::env::current_exe() {
        for ancestor in exe.ancestors().skip(1).take(4) {
            candidates.push(ancestor.join(SUBSET_DIR));
        }
    }
    candidates
        .into_iter()
        .map(|dir| dir.canonicalize().unwrap_or(dir))
        .collect()
}

fn locate_data_dir(
    flag: Option<&Path>,
    env: Option<OsString>,
    system_dir: &Path,
    subset_dirs: &[PathBuf],
) -> Result<(PathBuf, DataOrigin), ModelError> {
    let explicit = match (flag, env) {
        (Some(dir), _) => Some((dir.to_path_buf(), DataOrigin::Flag)),
        (None, Some(dir)) if !dir.is_empty() => Some((PathBuf::from(dir), DataOrigin::Env)),
        _ => None,
    };
    if let Some((dir, origin)) = explicit {
        if !dir.is_dir() {
            return Err(ModelError::DataDirNotFound {
                path: dir,
                origin: origin.to_string(),
            });
        }
        return Ok((dir, origin));
    }

    if has_train_images(system_dir) {
        return Ok((system_dir.to_path_buf(), DataOrigin::System));
    }
    if let Some(dir) = subset_dirs.iter().find(|dir| has_train_images(dir)) {
        return Ok((dir.clone(), DataOrigin::Subset));
    }

    let mut tried = vec![
        "--data-dir (not given)".to_string(),
        format!("{DATA_DIR_ENV} (not set)"),
        system_dir.display().to_string(),
    ];
    tried.extend(subset_dirs.iter().map(|dir| dir.display().to_string()));
    Err(ModelError::NoDataDir { tried })
}

fn has_train_images(dir: &Path) -> bool {
    find_idx_file(dir, TRAIN_IMAGES).is_some()
}

/// Returns the path of `NAME.gz` or `NAME` in `dir`, preferring the gzip file.
fn find_idx_file(dir: &Path, name: &str) -> Option<PathBuf> {
    [format!("{name}.gz"), name.to_string()]
        .into_iter()
        .map(|file| dir.join(file))
        .find(|path| path.is_file())
}

/// Loads the training and test sets from the standard IDX files in `dir`
/// (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
/// `t10k-labels-idx1-ubyte`), each gzip-compressed with a `.gz` suffix or raw.
pub fn load_dataset(dir: &Path) -> Result<(Dataset, Dataset), ModelError> {
    if !dir.is_dir() {
        return Err(ModelError::DataDirNotFound {
            path: dir.to_path_buf(),
            origin: "given to load_dataset".to_string(),
        });
    }
    let train = load_split(dir, TRAIN_IMAGES, TRAIN_LABELS)?;
    let test = load_split(dir, TEST_IMAGES, TEST_LABELS)?;

    if (train.rows, train.cols) != (test.rows, test.cols) {
        return Err(ModelError::InvalidIdx {
            path: dir.join(TEST_IMAGES),
            reason: format!(
                "test images are {}x{} but training images are {}x{}",
                test.rows, test.cols, train.rows, train.cols
            ),
        });
    }
    Ok((train, test))
}

fn load_split(dir: &Path, images_name: &str, labels_name: &str) -> Result<Dataset, ModelError> {
    let missing = |name: &str| ModelError::MissingDataFile {
        dir: dir.to_path_buf(),
        name: name.to_string(),
    };
    let images_path = find_idx_file(dir, images_name).ok_or_else(|| missing(images_name))?;
    let labels_path = find_idx_file(dir, labels_name).ok_or_else(|| missing(labels_name))?;

    let (image_dims, images) = read_idx(&images_path, 3)?;
    let (label_dims, labels) = read_idx(&labels_path, 1)?;
    let (count, rows, cols) = (image_dims[0], image_dims[1], image_dims[2]);

    let invalid = |path: &Path, reason: String| ModelError::InvalidIdx {
        path: path.to_path_buf(),
        reason,
    };
    if count == 0 || rows == 0 || cols == 0 {
        return Err(invalid(
            &images_path,
            format!("empty image set: dimensions {count}x{rows}x{cols}"),
        ));
    }
    if label_dims[0] != count {
        return Err(invalid(
            &labels_path,
            format!(
                "{} labels but {} contains {count} images",
                label_dims[0],
                images_path.display()
            ),
        ));
    }
    if let Some(index) = labels
        .iter()
        .position(|&label| usize::from(label) >= NUM_CLASSES)
    {
        return Err(invalid(
            &labels_path,
            format!(
                "label {} at index {index} is not a class in 0..{NUM_CLASSES}",
                labels[index]
            ),
        ));
    }

    Ok(Dataset {
        images,
        labels,
        rows,
        cols,
    })
}

/// Reads an unsigned-byte IDX file with `ndims` dimensions, gzip-compressed or raw, and
/// returns its dimensions and data.
fn read_idx(path: &Path, ndims: usize) -> Result<(Vec<usize>, Vec<u8>), ModelError> {
    let invalid = |reason: String| ModelError::InvalidIdx {
        path: path.to_path_buf(),
        reason,
    };
    let mut bytes = fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;

    // Gzip streams start with the bytes 1f 8b, which no IDX header does.
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut decoded = Vec::new();
        GzDecoder::new(bytes.as_slice())
            .read_to_end(&mut decoded)
            .map_err(|error| invalid(format!("failed to decompress gzip data: {error}")))?;
        bytes = decoded;
    }

    // The magic number is two zero bytes, the element type (0x08 = unsigned byte) and the
    // number of dimensions. The dimensions follow as big-endian u32.
    let expected_magic = [0, 0, 0x08, ndims as u8];
    let header_len = 4 + 4 * ndims;
    if bytes.len() < 4 {
        return Err(invalid(format!(
            "truncated header: {} bytes, expected at least {header_len}",
            bytes.len()
        )));
    }
    if bytes[..4] != expected_magic {
        return Err(invalid(format!(
            "magic number 0x{}, expected 0x{} (unsigned bytes, {ndims} dimensions)",
            hex(&bytes[..4]),
            hex(&expected_magic)
        )));
    }
    if bytes.len() < header_len {
        return Err(invalid(format!(
            "truncated header: {} bytes, expected at least {header_len}",
            bytes.len()
        )));
    }

    let dims: Vec<usize> = bytes[4..header_len]
        .chunks_exact(4)
        .map(|chunk| u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize)
        .collect();
    let data_len = dims
        .iter()
        .try_fold(1usize, |len, &dim| len.checked_mul(dim))
        .ok_or_else(|| invalid(format!("dimensions {dims:?} overflow the address space")))?;
    let actual_len = bytes.len() - header_len;
    if actual_len < data_len {
        return Err(invalid(format!(
            "truncated: dimensions {dims:?} need {data_len} data bytes, found {actual_len}"
        )));
    }
    if actual_len > data_len {
        return Err(invalid(format!(
            "{} unexpected bytes after the {data_len} data bytes of dimensions {dims:?}",
            actual_len - data_len
        )));
    }

    bytes.drain(..header_len);
    Ok((dims, bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    fn subset_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-subset")
    }

    fn idx_bytes(ndims: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0, 0, 0x08, ndims];
        for dim in dims {
            bytes.extend_from_slice(&dim.to_be_bytes());
        }
        bytes.extend_from_slice(data);
        bytes
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// Writes a tiny data set (3 training and 2 test images of 2x2 pixels) into `dir`.
    fn write_tiny_dataset(dir: &Path, compress: bool) {
        let files = [
            (
                TRAIN_IMAGES,
                idx_bytes(3, &[3, 2, 2], &(0..12).collect::<Vec<u8>>()),
            ),
            (TRAIN_LABELS, idx_bytes(1, &[3], &[0, 5, 9])),
            (TEST_IMAGES, idx_bytes(3, &[2, 2, 2], &[255; 8])),
            (TEST_LABELS, idx_bytes(1, &[2], &[1, 2])),
        ];
        for (name, bytes) in files {
            if compress {
                fs::write(dir.join(format!("{name}.gz")), gzip(&bytes)).unwrap();
            } else {
                fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }

    #[test]
    fn load_dataset_reads_raw_and_gzip() {
        let raw_dir = tempfile::tempdir().unwrap();
        let gz_dir = tempfile::tempdir().unwrap();
        write_tiny_dataset(raw_dir.path(), false);
        write_tiny_dataset(gz_dir.path(), true);

        let (train, test) = load_dataset(raw_dir.path()).unwrap();
        assert_eq!((train.rows, train.cols), (2, 2));
        assert_eq!(train.labels, vec![0, 5, 9]);
        assert_eq!(train.images, (0..12).collect::<Vec<u8>>());
        assert_eq!(train.image(1), &[4, 5, 6, 7]);
        assert_eq!(test.len(), 2);

        assert_eq!(load_dataset(gz_dir.path()).unwrap(), (train, test));
    }

    #[test]
    fn load_dataset_reads_shipped_subset() {
        let (train, test) = load_dataset(&subset_dir()).unwrap();
        assert_eq!(train.len(), 5000);
        assert_eq!(test.len(), 1000);
        assert_eq!((train.rows, train.cols), (28, 28));
        assert_eq!(train.images.len(), 5000 * 784);
        // Counts per class written down when the subset was made.
        let mut counts = [0usize; 10];
        for &label in &train.labels {
            counts[usize::from(label)] += 1;
        }
        assert_eq!(counts, [457, 556, 504, 501, 488, 493, 493, 512, 490, 506]);
    }

    #[test]
    fn truncated_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_dataset(dir.path(), false);
        let path = dir.path().join(TRAIN_IMAGES);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();

        let error = load_dataset(dir.path()).unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains("truncated"), "{error}");
        assert!(error.contains("need 12 data bytes, found 9"), "{error}");
    }

    #[test]
    fn truncated_gzip_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_dataset(dir.path(), true);
        let path = dir.path().join(format!("{TRAIN_LABELS}.gz"));
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();

        let error = load_dataset(dir.path()).unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains("gzip"), "{error}");
    }

    #[test]
    fn bad_magic_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_dataset(dir.path(), false);
        // A labels file where images are expected.
        let path = dir.path().join(TEST_IMAGES);
        fs::write(&path, idx_bytes(1, &[2], &[1, 2])).unwrap();

        let error = load_dataset(dir.path()).unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(
            error.contains("magic number 0x00000801, expected 0x00000803"),
            "{error}"
        );
        assert!(error.contains("dataset-fashion-mnist"), "{error}");
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_dataset(dir.path(), false);
        fs::write(dir.path().join(TEST_LABELS), idx_bytes(1, &[2], &[1, 2, 3])).unwrap();

        let error = load_dataset(dir.path()).unwrap_err().to_string();
        assert!(error.contains("1 unexpected bytes"), "{error}");
    }

    #[test]
    fn label_count_mismatch_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_dataset(dir.path(), false);
        fs::write(dir.path().join(TRAIN_LABELS), idx_bytes(1, &[2], &[1, 2])).unwrap();

        let error = load_dataset(dir.path()).unwrap_err().to_string();
        assert!(error.contains("2 labels but"), "{error}");
        assert!(error.contains("contains 3 images"), "{error}");
    }

    #[test]
    fn label_out_of_range_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_dataset(dir.path(), false);
        fs::write(dir.path().join(TEST_LABELS), idx_bytes(1, &[2], &[1, 10])).unwrap();

        let error = load_dataset(dir.path()).unwrap_err().to_string();
        assert!(error.contains("label 10 at index 1"), "{error}");
    }

    #[test]
    fn missing_file_names_file_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_dataset(dir.path(), true);
        fs::remove_file(dir.path().join(format!("{TEST_LABELS}.gz"))).unwrap();

        let error = load_dataset(dir.path()).unwrap_err().to_string();
        assert!(error.contains(TEST_LABELS), "{error}");
        assert!(error.contains(&dir.path().display().to_string()), "{error}");
        assert!(error.contains("scripts/download-data.sh"), "{error}");
    }

    #[test]
    fn missing_flag_dir_names_path_and_fix() {
        let missing = Path::new("/nonexistent/fedcompress-data");
        let error = resolve_data_dir(Some(missing)).unwrap_err().to_string();
        assert!(error.contains("/nonexistent/fedcompress-data"), "{error}");
        assert!(error.contains("--data-dir"), "{error}");
        assert!(
            error.contains("apt-get install dataset-fashion-mnist"),
            "{error}"
        );
        assert!(error.contains("scripts/download-data.sh DIR"), "{error}");
    }

    #[test]
    fn missing_env_dir_names_variable() {
        let system = tempfile::tempdir().unwrap();
        let error = locate_data_dir(
            None,
            Some("/nonexistent/env-data".into()),
            system.path(),
            &[subset_dir()],
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("/nonexistent/env-data"), "{error}");
        assert!(error.contains(DATA_DIR_ENV), "{error}");
    }

    #[test]
    fn data_dir_precedence() {
        let flag = tempfile::tempdir().unwrap();
        let env = tempfile::tempdir().unwrap();
        let system = tempfile::tempdir().unwrap();
        let subset = [subset_dir()];

        let resolve = |flag: Option<&Path>, env: Option<&Path>| {
            locate_data_dir(flag, env.map(OsString::from), system.path(), &subset).unwrap()
        };

        // The system directory counts only once it contains the training images.
        assert_eq!(resolve(None, None), (subset_dir(), DataOrigin::Subset));
        write_tiny_dataset(system.path(), true);
        assert_eq!(
            resolve(None, None),
            (system.path().to_path_buf(), DataOrigin::System)
        );
        assert_eq!(
            resolve(None, Some(env.path())),
            (env.path().to_path_buf(), DataOrigin::Env)
        );
        assert_eq!(
            resolve(Some(flag.path()), Some(env.path())),
            (flag.path().to_path_buf(), DataOrigin::Flag)
        );
    }

    #[test]
    fn no_data_dir_lists_candidates() {
        let empty = tempfile::tempdir().unwrap();
        let error = locate_data_dir(None, None, empty.path(), &[empty.path().join("subset")])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&empty.path().display().to_string()),
            "{error}"
        );
        assert!(error.contains("--data-dir"), "{error}");
    }

    #[test]
    fn subset_keeps_order_and_pixels() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_dataset(dir.path(), false);
        let (train, _) = load_dataset(dir.path()).unwrap();

        let picked = train.subset(&[2, 0]);
        assert_eq!(picked.labels, vec![9, 0]);
        assert_eq!(picked.images, vec![8, 9, 10, 11, 0, 1, 2, 3]);
    }

    #[test]
    fn pixels_are_standardized() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_dataset(dir.path(), false);
        let (_, test) = load_dataset(dir.path()).unwrap();

        let pixels = test.standardized_pixels(&[0]);
        let expected = (1.0 - PIXEL_MEAN) / PIXEL_STD;
        assert_eq!(pixels, vec![expected; 4]);
    }
}
