//! Sample grids: many equally sized images tiled into one, for a single TensorBoard image or PNG.

/// Colour of the 1-px separators and of the empty cells of an unfilled last row.
const SEPARATOR: u8 = 255;

/// Tiles `images` (each `height`×`width`×`channels` u8, row-major, interleaved) into rows of
/// `columns`, with 1-px separators between cells. Returns the grid and its height and width;
/// no images give an empty grid of size 0×0.
///
/// Panics when an image has the wrong length: the images come from the sampler, so a mismatch
/// is a bug in the caller, not bad input.
pub fn image_grid(
    images: &[Vec<u8>],
    height: usize,
    width: usize,
    channels: usize,
    columns: usize,
) -> (Vec<u8>, usize, usize) {
    if images.is_empty() {
        return (Vec::new(), 0, 0);
    }
    let columns = columns.clamp(1, images.len());
    let rows = images.len().div_ceil(columns);
    let grid_height = rows * height + rows - 1;
    let grid_width = columns * width + columns - 1;
    let row_bytes = width * channels;
    let grid_row_bytes = grid_width * channels;
    let mut grid = vec![SEPARATOR; grid_height * grid_row_bytes];
    for (index, image) in images.iter().enumerate() {
        assert_eq!(
            image.len(),
            height * row_bytes,
            "image_grid: image {index} has {} bytes, expected {height}×{width}×{channels}",
            image.len()
        );
        let top = (index / columns) * (height + 1);
        let left = (index % columns) * (width + 1) * channels;
        for (y, row) in image.chunks_exact(row_bytes).enumerate() {
            let start = (top + y) * grid_row_bytes + left;
            grid[start..start + row_bytes].copy_from_slice(row);
        }
    }
    (grid, grid_height, grid_width)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(value: u8, len: usize) -> Vec<u8> {
        vec![value; len]
    }

    #[test]
    fn two_by_three_rgb_grid_places_each_image_in_its_cell() {
        let images: Vec<Vec<u8>> = (0..6).map(|i| filled(i * 10, 4 * 5 * 3)).collect();
        let (grid, grid_height, grid_width) = image_grid(&images, 4, 5, 3, 3);
        assert_eq!((grid_height, grid_width), (2 * 4 + 1, 3 * 5 + 2));
        assert_eq!(grid.len(), grid_height * grid_width * 3);
        let pixel = |y: usize, x: usize| grid[(y * grid_width + x) * 3];
        for index in 0..6usize {
            let (row, column) = (index / 3, index % 3);
            let (top, left) = (row * 5, column * 6);
            assert_eq!(pixel(top, left), index as u8 * 10);
            assert_eq!(pixel(top + 3, left + 4), index as u8 * 10);
        }
        assert_eq!(pixel(4, 0), SEPARATOR, "row separator");
        assert_eq!(pixel(0, 5), SEPARATOR, "column separator");
    }

    #[test]
    fn incomplete_last_row_is_background() {
        let images = vec![filled(1, 2 * 2), filled(2, 2 * 2), filled(3, 2 * 2)];
        let (grid, grid_height, grid_width) = image_grid(&images, 2, 2, 1, 2);
        assert_eq!((grid_height, grid_width), (5, 5));
        assert_eq!(grid[3 * 5], 3);
        assert_eq!(grid[3 * 5 + 3], SEPARATOR);
    }

    #[test]
    fn more_columns_than_images_gives_one_row() {
        let images = vec![filled(9, 3), filled(8, 3)];
        let (_, grid_height, grid_width) = image_grid(&images, 1, 1, 3, 8);
        assert_eq!((grid_height, grid_width), (1, 3));
        assert_eq!(image_grid(&[], 4, 4, 3, 2), (Vec::new(), 0, 0));
    }

    #[test]
    #[should_panic(expected = "image 1 has 5 bytes")]
    fn wrong_image_size_is_a_bug() {
        image_grid(&[filled(0, 4), filled(0, 5)], 2, 2, 1, 2);
    }
}
