"""DToP's reproductions: the tiny preset on the shipped segmentation test-bed and the full ADE20K preset."""
