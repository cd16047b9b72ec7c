"""One `ComponentResource` per concern. Every child is created with `parent=self` and the region's explicit
`aws.Provider`, so nothing ever falls back to the ambient default region."""
