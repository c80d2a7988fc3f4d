"""What every module agrees on about a slice image: pixel conventions, SliceDataset, SSIM and PSNR."""
